"""The built-in clip-tags vocabulary: short phrases about what LoRA datasets usually vary in (subject, framing,
setting, light, style, colour). Each phrase is ranked on its own, so a phrase reads well at the start of a caption."""

TAGS = (
    # subject
    "a person", "a man", "a woman", "a child", "a group of people", "a face", "a portrait", "a dog", "a cat",
    "a bird", "a horse", "an animal", "a car", "a building", "a house", "a room", "a city street", "a landscape",
    "a mountain", "a forest", "a beach", "the sea", "a lake", "a river", "a field", "a garden", "flowers", "a tree",
    "food", "a plate of food", "a drink", "a product", "a bottle", "a toy", "a logo", "text", "a car interior",
    "furniture", "a character", "a creature", "a robot", "a statue", "clothing", "a dress", "a hat", "glasses",
    # framing
    "a close-up", "an extreme close-up", "a full-body shot", "an upper-body shot", "a headshot", "a profile view",
    "a view from behind", "a wide shot", "an aerial view", "a view from below", "a symmetrical composition",
    "a centered subject", "a blurred background", "shallow depth of field", "a plain background",
    "a white background", "a black background", "a studio backdrop",
    # setting
    "indoors", "outdoors", "at night", "during the day", "at sunset", "in the snow", "in the rain", "in fog",
    "underwater", "in a studio", "in a kitchen", "in a bedroom", "in an office", "on a stage", "in a park",
    "in the desert", "in space",
    # light
    "soft light", "harsh light", "natural light", "backlit", "golden hour light", "neon light", "candlelight",
    "dramatic lighting", "low light", "high contrast", "overexposed", "underexposed",
    # medium and style
    "a photo", "a snapshot", "a professional photo", "a film photo", "a black and white photo", "a selfie",
    "a painting", "an oil painting", "a watercolor painting", "a drawing", "a pencil sketch", "an ink drawing",
    "a digital illustration", "concept art", "anime style", "a cartoon", "comic book style", "pixel art",
    "a 3d render", "low poly", "a vector illustration", "a poster", "a screenshot", "a collage", "minimalist",
    "surreal", "vintage", "retro", "futuristic", "cinematic", "impressionist", "abstract art",
    "a photorealistic image",
    # colour and mood
    "colorful", "muted colors", "pastel colors", "monochrome", "sepia", "warm colors", "cool colors",
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "gray", "black", "white",
    "bright", "dark", "moody", "happy", "calm", "dramatic",
)  # fmt: skip
