"""Text side of text-to-video: tokenizers and text encoders.

``tokenizer.HashWordTokenizer`` needs no downloads (words hashed to ids); ``encoder.TrainableTextEncoder`` is
a small transformer trained with the DiT. Pretrained encoders (T5, MiniLM) implement the same ``TextEncoder``
protocol (``encoder.py``) so the rest of the system does not care which one it gets.
"""
