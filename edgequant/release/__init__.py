"""Releases: a recipe (TOML) in, a folder of quantized files, manifest, model card and Modelfile out."""
