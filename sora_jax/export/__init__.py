"""Export to PyTorch and back: the PyTorch twins of the models (``sora_torch/``, copied into every exported
folder), the JAX <-> torch parameter names (``names``), the diffusers-layout writer (``writer``) and the
importer that turns an exported folder back into a JAX workdir (``importer``)."""
