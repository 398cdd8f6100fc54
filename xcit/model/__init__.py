"""The XCiT architecture in plain PyTorch: the architecture record and variants table, the model, timm's API, the
pyramid, preprocessing."""
