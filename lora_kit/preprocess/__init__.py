"""lora-ppim as a library: turn a folder of photos into a training set (images, .txt captions, masks, manifest.jsonl).

    from lora_kit.preprocess import PreprocessConfig, run
    summary = run(PreprocessConfig("photos", "data", caption="template", token="sks"))

Modules: images (find, open, validate), crop (geometry), caption (template, clip-tags, model), masks (CLIPSeg),
manifest (output folder, manifest.jsonl, report.json), run (the pipeline). torch and transformers are imported only
by the functions that run models.
"""

from .config import PreprocessConfig
from .run import Summary, run

__all__ = ["PreprocessConfig", "Summary", "run"]
