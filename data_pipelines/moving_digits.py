"""``python -m data_pipelines.moving_digits --out DIR ...``: build the bundled moving-digits dataset.

The generator lives in the library (``sora_jax.data.moving_digits``: the trainer and the demo build the same
data when a workdir has none); this is its command line.
"""

from sora_jax.data.moving_digits import main

if __name__ == "__main__":
    main()
