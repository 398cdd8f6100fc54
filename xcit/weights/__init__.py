"""Weight files of every format (timm, official, MindCV/MindSpore, safetensors, hub folders), loading a model from
them, create_model and the dense backbone."""
