"""Text side of text-to-video: tokenizers and text encoders.

``tokenizer.HashWordTokenizer`` needs no downloads (words hashed to ids); ``encoder.TrainableTextEncoder`` is
a small transformer trained with the DiT. Pretrained encoders (T5, MiniLM) implement the same ``TextEncoder``
protocol (``encoder.py``) so the rest of the system does not care which one it gets; ``frozen`` runs them
frozen as the DiT's conditioning, and ``loader.load_text_encoder`` (``api.load_text_encoder``) loads one by
name ("minilm") or Hugging Face folder.
"""
