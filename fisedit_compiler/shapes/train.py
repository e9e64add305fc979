"""Train the "shapes" pipeline from scratch on rendered scenes, within a time budget.

    python -m fisedit_compiler.shapes.train --out DIR --minutes M [--resume]

Stage 1 trains the AutoencoderKL (L1 + MSE reconstruction and a small KL term; simple images,
so a couple of minutes suffice), then sets its ``scaling_factor`` to 1 / std of the latents.
Stage 2 trains the U-Net and the text encoder jointly on the frozen VAE's latents: v-prediction
MSE under the cosine schedule of ``model.SCHEDULER_CONFIG``, captions dropped to "" 10% of the
time (classifier-free guidance), EMA weights kept for sampling. Data are rendered on the fly on
the training device (``render.random_batch`` + ``render.render``): no data set, no loader
processes, no pillow. On CUDA the models run under bf16 autocast; the VAE in channels-last
layout, the U-Net contiguous (at 16x16 its group norms' copies back from channels-last cost
more than cuDNN gains). Measured on an H100 (torch 2.11, bf16): the U-Net step is bound by
the host's kernel launches (~2700 a step, ~150 ms) up to a batch of about 1024, so the
default batch is 1024: 6.0 steps/s, 6100 images/s (a 256 batch gave 6.3 steps/s, 1600
images/s); the VAE step at batch 256 takes 63 ms (4100 images/s) after ~14 s of cuDNN
autotuning. torch.compile cut the U-Net step by a quarter but took ~100 s to compile, which
a 7-minute budget does not win back (``--compile`` keeps it available). With ``--minutes 7``:
~1100 VAE steps in 84 s, ~2000 U-Net steps (2 M images) in 336 s, ~30 s to save and evaluate.

``--minutes`` is the whole training budget across runs (``--vae-fraction`` of it for stage 1;
learning rates follow a warmup + cosine schedule over each stage's share). A run also stops
at ``--max-run-minutes`` of wall time (leaving time to save), at ``--stop-after-steps`` (tests)
or on SIGTERM: it then writes the checkpoint (also written every ``--checkpoint-every``
seconds into ``--work``) and exits with code 3; ``--resume`` continues from it. When the
budget is spent the script keeps the EMA or the last weights, whichever the checker prefers
on 100 captions, saves the pipeline in fp16 with ``save_pretrained`` to ``--out``
(optionally also as a .tar.gz whose top folder is ``weights``, split into parts under the
device tool's 16 MiB file limit), reloads it from
there in fp32, generates a fixed set of eval captions and prints the checker's accuracy as
JSON lines, and writes a sample grid (PNG with pillow, else .npy) into ``--work``.

Progress lines start with ``[vae]`` / ``[unet]``; JSON lines (``{"event": ...}``) carry the
throughput (``throughput``), the evaluation (``eval``) and the final summary (``done``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import signal
import sys
import tarfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checker, model, render

EXIT_PAUSED = 3
EVAL_SEED = 20240607
CHECKPOINT = "checkpoint.pt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fisedit_compiler.shapes.train",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the trained pipeline "
                   "(save_pretrained); e.g. fisedit_compiler/shapes/weights")
    p.add_argument("--minutes", type=float, default=7.0,
                   help="training budget in minutes, both stages, across runs (default 7)")
    p.add_argument("--resume", action="store_true", help="continue from --work's checkpoint")
    p.add_argument("--work", default=None,
                   help="checkpoints, samples and metrics (default: OUT + '-work')")
    p.add_argument("--max-run-minutes", type=float, default=9.5,
                   help="wall-clock limit of this run, saving and evaluation included; the "
                        "run checkpoints and exits with code 3 before it (default 9.5)")
    p.add_argument("--vae-fraction", type=float, default=0.2,
                   help="share of the budget for the VAE (default 0.2)")
    p.add_argument("--batch", type=int, default=1024, help="diffusion batch (default 1024)")
    p.add_argument("--vae-batch", type=int, default=256, help="VAE batch (default 256)")
    p.add_argument("--lr", type=float, default=1e-3, help="U-Net + text encoder peak lr")
    p.add_argument("--vae-lr", type=float, default=1e-3, help="VAE peak lr")
    p.add_argument("--ema", type=float, default=0.998, help="EMA decay (default 0.998)")
    p.add_argument("--uncond", type=float, default=0.1,
                   help="probability of dropping the caption (default 0.1)")
    p.add_argument("--size", type=int, default=model.IMAGE_SIZE, help="image size (default 64)")
    p.add_argument("--tiny", action="store_true", help="tiny models (smoke tests)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (CUDA)")
    p.add_argument("--vae-steps", type=int, default=0, help="stage-1 step cap (0: time only)")
    p.add_argument("--unet-steps", type=int, default=0, help="stage-2 step cap (0: time only)")
    p.add_argument("--stop-after-steps", type=int, default=0,
                   help="pause this run after this many steps (tests of --resume)")
    p.add_argument("--checkpoint-every", type=float, default=60.0, help="seconds (default 60)")
    p.add_argument("--log-every", type=int, default=100, help="steps between progress lines")
    p.add_argument("--eval-captions", type=int, default=100)
    p.add_argument("--eval-steps", type=int, default=25, help="DDIM steps for the evaluation")
    p.add_argument("--eval-guidance", default="3,5,7.5",
                   help="comma-separated guidance scales to evaluate (default 3,5,7.5)")
    p.add_argument("--archive", default=None,
                   help="also write the pipeline as this .tar.gz (top folder 'weights'), in "
                        "parts PATH.part0, PATH.part1, ... of at most --archive-part-mb")
    p.add_argument("--archive-part-mb", type=float, default=15.0,
                   help="largest archive file in MiB (default 15; 0: one file)")
    return p.parse_args(argv)


def log(message: str) -> None:
    print(message, flush=True)


def event(name: str, **fields) -> None:
    print(json.dumps({"event": name, **fields}), flush=True)


class Trainer:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available()
                                                   else "cpu"))
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.out = Path(args.out)
        self.work = Path(args.work) if args.work else Path(str(self.out).rstrip("/") + "-work")
        self.budget = args.minutes * 60.0
        self.vae_budget = self.budget * args.vae_fraction
        self.unet_budget = self.budget - self.vae_budget

        torch.manual_seed(args.seed)
        self.tok = model.tokenizer()
        self.words = model.WordEncoder(self.tok)
        # The VAE works at 64x64 with many channels: channels-last (NHWC) suits cuDNN there;
        # the U-Net at 16x16 runs faster contiguous (its group norms copy NHWC back).
        self.vae_format = torch.channels_last if self.cuda else torch.contiguous_format
        self.vae = model.build_vae(args.tiny, args.seed, args.size).to(
            self.device, memory_format=self.vae_format)
        self.text = model.build_text_encoder(self.tok, args.tiny, args.seed + 1).to(self.device)
        self.unet = model.build_unet(args.tiny, args.seed + 2, args.size).to(self.device)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.ema_text = copy.deepcopy(self.text).requires_grad_(False)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99),
                                         weight_decay=0.0, **self._fused())
        self.opt = torch.optim.AdamW(list(self.unet.parameters()) + list(self.text.parameters()),
                                     lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01,
                                     **self._fused())
        alphas = model.training_scheduler().alphas_cumprod
        self.alphas_cumprod = alphas.to(self.device, torch.float32)
        self.rng = np.random.default_rng(args.seed)
        self.state = {"stage": "vae", "vae_step": 0, "vae_time": 0.0, "unet_step": 0,
                      "unet_time": 0.0, "scaling_factor": None}
        self.unet_fwd = torch.compile(self.unet) if args.compile and self.cuda else self.unet

    def _fused(self) -> dict:
        return {"fused": True} if self.cuda else {}

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()

    # -- checkpoints ----------------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        return self.work / CHECKPOINT

    def save_checkpoint(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        blob = {"state": self.state, "rng": self.rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if self.cuda else None,
                "config": {"tiny": self.args.tiny, "size": self.args.size},
                "vae": self.vae.state_dict(), "vae_opt": self.vae_opt.state_dict(),
                "unet": self.unet.state_dict(), "text": self.text.state_dict(),
                "ema_unet": self.ema_unet.state_dict(), "ema_text": self.ema_text.state_dict(),
                "opt": self.opt.state_dict()}
        tmp = self.checkpoint_path().with_suffix(".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, self.checkpoint_path())

    def load_checkpoint(self) -> None:
        path = self.checkpoint_path()
        if not path.is_file():
            raise SystemExit(f"--resume: no checkpoint at {path}; run without --resume first "
                             "(or pass the --work folder of the earlier run)")
        # Weights-only: the checkpoint holds tensors, numbers and strings; nothing in it needs
        # (or may run) arbitrary unpickling.
        blob = torch.load(path, map_location=self.device, weights_only=True)
        if blob["config"] != {"tiny": self.args.tiny, "size": self.args.size}:
            raise SystemExit(f"--resume: the checkpoint was made with {blob['config']}, not "
                             f"tiny={self.args.tiny} size={self.args.size}")
        for name in ("vae", "unet", "text", "ema_unet", "ema_text"):
            getattr(self, name).load_state_dict(blob[name])
        self.vae_opt.load_state_dict(blob["vae_opt"])
        self.opt.load_state_dict(blob["opt"])
        self.state = blob["state"]
        self.rng.bit_generator.state = blob["rng"]
        torch.set_rng_state(blob["torch_rng"])
        if self.cuda and blob["cuda_rng"] is not None:
            torch.cuda.set_rng_state(blob["cuda_rng"])
        if self.state["scaling_factor"] is not None:
            self.vae.register_to_config(scaling_factor=self.state["scaling_factor"])
        log(f"resumed from {path}: stage {self.state['stage']}, vae step "
            f"{self.state['vae_step']} ({self.state['vae_time']:.0f} s), unet step "
            f"{self.state['unet_step']} ({self.state['unet_time']:.0f} s)")

    # -- data -----------------------------------------------------------------------------
    def images(self, n: int):
        """A batch of rendered scenes in [-1, 1] on the device, and their captions."""
        batch = render.random_batch(self.rng, n)
        x = render.render(render.pack_batch(batch, self.device), self.args.size)
        return (x * 2 - 1).contiguous(memory_format=self.vae_format), \
            render.batch_captions(batch)

    # -- schedules ------------------------------------------------------------------------
    @staticmethod
    def lr_factor(progress: float, step: int, warmup: int) -> float:
        """Linear warmup over ``warmup`` steps, then cosine from 1 to 0.1 over the stage."""
        progress = min(max(progress, 0.0), 1.0)
        return min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi
                                                                               * progress)))

    def progress(self, stage: str) -> float:
        time_budget = self.vae_budget if stage == "vae" else self.unet_budget
        cap = self.args.vae_steps if stage == "vae" else self.args.unet_steps
        by_time = self.state[f"{stage}_time"] / time_budget if time_budget > 0 else 1.0
        by_steps = self.state[f"{stage}_step"] / cap if cap else 0.0
        return max(by_time, by_steps)

    # -- steps ----------------------------------------------------------------------------
    def vae_step(self) -> torch.Tensor:
        n = self.args.vae_batch
        x, _ = self.images(n)
        factor = self.lr_factor(self.progress("vae"), self.state["vae_step"], 100)
        for group in self.vae_opt.param_groups:
            group["lr"] = self.args.vae_lr * factor
        with self.autocast():
            posterior = self.vae.encode(x).latent_dist
            reconstruction = self.vae.decode(posterior.sample()).sample
        reconstruction = reconstruction.float()
        kl = posterior.kl().float().mean()
        loss = F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x) + 1e-6 * kl
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
        self.vae_opt.step()
        return loss.detach()

    @torch.no_grad()
    def finish_vae(self) -> None:
        """Set the VAE's scaling factor to 1 / std of its (sampled) latents."""
        self.vae.eval()
        latents = []
        for _ in range(4):
            x, _ = self.images(self.args.vae_batch)
            with self.autocast():
                latents.append(self.vae.encode(x).latent_dist.sample().float())
        latents = torch.cat(latents)
        scaling = float(1.0 / latents.std())
        self.state["scaling_factor"] = scaling
        self.vae.register_to_config(scaling_factor=scaling)
        event("vae_done", steps=self.state["vae_step"], seconds=round(self.state["vae_time"], 1),
              latent_mean=[round(v, 3) for v in latents.mean(dim=(0, 2, 3)).tolist()],
              latent_std=round(float(latents.std()), 4), scaling_factor=round(scaling, 5))

    def unet_step(self) -> torch.Tensor:
        args = self.args
        x, captions = self.images(args.batch)
        drop = self.rng.random(len(captions)) < args.uncond
        captions = ["" if d else c for c, d in zip(captions, drop)]
        ids = self.words(captions).to(self.device, non_blocking=True)
        factor = self.lr_factor(self.progress("unet"), self.state["unet_step"], 200)
        for group in self.opt.param_groups:
            group["lr"] = args.lr * factor
        with torch.no_grad(), self.autocast():
            latents = self.vae.encode(x).latent_dist.sample().float()
        latents = latents * self.state["scaling_factor"]
        noise = torch.randn_like(latents)
        t = torch.randint(0, len(self.alphas_cumprod), (latents.shape[0],), device=self.device)
        a = self.alphas_cumprod[t].sqrt()[:, None, None, None]
        s = (1 - self.alphas_cumprod[t]).sqrt()[:, None, None, None]
        noisy = a * latents + s * noise
        target = a * noise - s * latents                      # v-prediction
        with self.autocast():
            states = self.text(ids)[0]
            prediction = self.unet_fwd(noisy, t, states, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.unet.parameters()) + list(self.text.parameters()),
                                       1.0)
        self.opt.step()
        step = self.state["unet_step"] + 1
        decay = min(args.ema, (1 + step) / (10 + step))
        for ema, live in ((self.ema_unet, self.unet), (self.ema_text, self.text)):
            ema_params = [p for p in ema.parameters()]
            live_params = [p.detach() for p in live.parameters()]
            torch._foreach_lerp_(ema_params, live_params, 1 - decay)
        return loss.detach()

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> int:
        args = self.args
        run_start = time.perf_counter()
        reserve = self.final_reserve()
        deadline = run_start + args.max_run_minutes * 60 - reserve
        stop = {"signal": None}

        def on_term(signum, frame):
            stop["signal"] = signum

        previous = signal.signal(signal.SIGTERM, on_term)
        self._steps_this_run = 0
        try:
            while self.state["stage"] != "done":
                stage = self.state["stage"]
                if self.stage_done(stage):
                    if stage == "vae":
                        self.finish_vae()
                    self.state["stage"] = "unet" if stage == "vae" else "done"
                    self.save_checkpoint()
                    continue
                self.train_stage(stage, deadline, stop)
                if not self.stage_done(stage):   # time-out, signal or --stop-after-steps
                    self.save_checkpoint()
                    why = (f"signal {stop['signal']}" if stop["signal"] else
                           "--stop-after-steps" if args.stop_after_steps
                           and self._steps_this_run >= args.stop_after_steps
                           else "--max-run-minutes")
                    log(f"paused by {why} in stage {stage}: checkpoint at "
                        f"{self.checkpoint_path()}; run the same command with --resume")
                    event("paused", stage=stage, vae_step=self.state["vae_step"],
                          unet_step=self.state["unet_step"], reason=why)
                    return EXIT_PAUSED
        finally:
            signal.signal(signal.SIGTERM, previous)
        return self.finalize()

    def final_reserve(self) -> float:
        """Seconds kept for saving and evaluation at the end of a run."""
        return 60.0 if self.cuda and not self.args.tiny else 0.0

    def stage_done(self, stage: str) -> bool:
        if stage == "done":
            return True
        cap = self.args.vae_steps if stage == "vae" else self.args.unet_steps
        budget = self.vae_budget if stage == "vae" else self.unet_budget
        if cap and self.state[f"{stage}_step"] >= cap:
            return True
        return self.state[f"{stage}_time"] >= budget

    def train_stage(self, stage: str, deadline: float, stop: dict) -> None:
        args = self.args
        module = self.vae if stage == "vae" else self.unet
        module.train()
        if stage == "unet":
            self.text.train()
            self.vae.eval()
        step_fn = self.vae_step if stage == "vae" else self.unet_step
        batch = args.vae_batch if stage == "vae" else args.batch
        losses = []
        last = time.perf_counter()
        last_checkpoint = last
        window_start, window_steps = None, 0
        stage_steps = 0
        while True:
            loss = step_fn()
            losses.append(loss)
            now = time.perf_counter()
            self.state[f"{stage}_time"] += now - last
            last = now
            self.state[f"{stage}_step"] += 1
            stage_steps += 1
            self._steps_this_run += 1
            if stage_steps == 10:        # throughput after warm-up (cudnn autotune, compile)
                if self.cuda:
                    torch.cuda.synchronize()
                window_start, window_steps = time.perf_counter(), 0
            elif window_start is not None:
                window_steps += 1
                if window_steps == 50:
                    if self.cuda:
                        torch.cuda.synchronize()
                    rate = window_steps / (time.perf_counter() - window_start)
                    budget = self.vae_budget if stage == "vae" else self.unet_budget
                    event("throughput", stage=stage, steps_per_s=round(rate, 2),
                          images_per_s=round(rate * batch), batch=batch,
                          expected_steps=int(rate * budget))
            step = self.state[f"{stage}_step"]
            if step % args.log_every == 0:
                mean = float(torch.stack(losses).mean())
                losses = []
                lr = (self.vae_opt if stage == "vae" else self.opt).param_groups[0]["lr"]
                budget = self.vae_budget if stage == "vae" else self.unet_budget
                log(f"[{stage}] step {step} loss {mean:.5f} lr {lr:.2e} "
                    f"time {self.state[f'{stage}_time']:.0f}/{budget:.0f} s")
            if now - last_checkpoint >= args.checkpoint_every:
                self.save_checkpoint()
                last_checkpoint = last = time.perf_counter()
            if self.stage_done(stage):
                break
            if (stop["signal"] or now >= deadline or (
                    args.stop_after_steps and self._steps_this_run >= args.stop_after_steps)):
                break
        module.eval()

    # -- the end --------------------------------------------------------------------------
    def finalize(self) -> int:
        args = self.args
        start = time.perf_counter()
        choice = self.choose_weights()
        # torch's own Module.to: diffusers' override warns about fp16 casts that need none here.
        vae, text, unet = (torch.nn.Module.to(copy.deepcopy(m), "cpu", torch.float16,
                                              memory_format=torch.contiguous_format)
                           for m in (self.vae, self.text, self.unet))
        pipe = model.assemble(vae, text, self.tok, unet)
        clear_output(self.out)
        pipe.save_pretrained(self.out, safe_serialization=True)
        size_mb = sum(f.stat().st_size for f in self.out.rglob("*") if f.is_file()) / 2**20
        log(f"saved the pipeline ({choice} weights) to {self.out} ({size_mb:.1f} MB fp16)")
        parts = write_archive(self.out, args.archive, args.archive_part_mb) \
            if args.archive else []
        metrics = evaluate(self.out, self.device, self.work, args)
        event("done", out=str(self.out), size_mb=round(size_mb, 2), weights=choice,
              archive=[str(p) for p in parts],
              vae_steps=self.state["vae_step"], vae_seconds=round(self.state["vae_time"], 1),
              unet_steps=self.state["unet_step"], unet_seconds=round(self.state["unet_time"], 1),
              finalize_seconds=round(time.perf_counter() - start, 1),
              scaling_factor=self.state["scaling_factor"], eval=metrics)
        return 0

    @torch.no_grad()
    def choose_weights(self) -> str:
        """Keep the EMA or the last weights, whichever the checker prefers on 100 captions
        (guidance 5, 20 steps; a few seconds on a GPU). After a few thousand steps the EMA
        can still lag behind, so this is measured rather than assumed."""
        candidates = {"last": (copy.deepcopy(self.unet.state_dict()),
                               copy.deepcopy(self.text.state_dict())),
                      "ema": (self.ema_unet.state_dict(), self.ema_text.state_dict())}
        scenes = eval_scenes(min(100, max(self.args.eval_captions, 1)))
        captions = [s.caption() for s in scenes]
        scores = {}
        for name, (unet_state, text_state) in candidates.items():
            self.unet.load_state_dict(unet_state)
            self.text.load_state_dict(text_state)
            pipe = model.assemble(self.vae, self.text, self.tok, self.unet)
            pipe.set_progress_bar_config(disable=True)
            images = generate(pipe, captions, steps=min(20, self.args.eval_steps),
                              guidance=5.0, seed=EVAL_SEED + 1)
            acc = checker.accuracy(checker.check_many(images, scenes))
            scores[name] = acc["objects"] + acc["background"] + acc["scene"]
            event("weights", candidate=name, **acc)
        choice = max(scores, key=lambda k: (scores[k], k == "ema"))
        self.unet.load_state_dict(candidates[choice][0])
        self.text.load_state_dict(candidates[choice][1])
        return choice


def write_archive(folder: Path, archive: str, part_mb: float) -> list[Path]:
    """``folder`` as a .tar.gz whose top folder is ``weights``; split into ``ARCHIVE.part0``,
    ``.part1``, ... when larger than ``part_mb`` MiB (the device tool returns files of at most
    16 MiB). Reassemble with ``cat ARCHIVE.part* | tar xzf - -C fisedit_compiler/shapes``."""
    path = Path(archive)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="weights")
    limit = int(part_mb * 2**20)
    if not limit or path.stat().st_size <= limit:
        log(f"wrote {path}; unpack with: tar xzf {path} -C fisedit_compiler/shapes")
        return [path]
    data = path.read_bytes()
    parts = []
    for i in range(0, len(data), limit):
        part = path.with_name(f"{path.name}.part{i // limit}")
        part.write_bytes(data[i:i + limit])
        parts.append(part)
    path.unlink()
    log(f"wrote {len(parts)} parts {path}.part*; unpack with: cat {path}.part* | "
        "tar xzf - -C fisedit_compiler/shapes")
    return parts


def clear_output(out: Path) -> None:
    """Make ``out`` an empty folder; only a folder holding a saved pipeline (model_index.json)
    is cleared, so a mistyped --out never deletes anything else."""
    if out.exists() and any(out.iterdir()):
        if not (out / "model_index.json").is_file():
            raise SystemExit(f"--out {out} is not empty and holds no saved pipeline; pass an "
                             "empty or new folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def eval_scenes(n: int) -> list[render.Scene]:
    """The fixed evaluation scenes (the same for every run)."""
    return render.random_scenes(np.random.default_rng(EVAL_SEED), n)


@torch.no_grad()
def generate(pipe, captions: list[str], *, steps: int, guidance: float, seed: int,
             chunk: int = 50) -> np.ndarray:
    """Images ``[N, H, W, 3]`` float in [0, 1]; chunk ``i`` draws its noise from ``seed + i``."""
    out = []
    for i in range(0, len(captions), chunk):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        result = pipe(captions[i:i + chunk], num_inference_steps=steps,
                      guidance_scale=guidance, generator=generator, output_type="np")
        out.append(result.images)
    return np.concatenate(out)


@torch.no_grad()
def evaluate(folder: Path, device, work: Path, args) -> dict:
    """Reload the saved pipeline (fp32), generate the eval captions and run the checker."""
    from ..pipeline_files import load_pipeline

    if args.eval_captions <= 0:
        return {}
    pipe = load_pipeline(folder, torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    scenes = eval_scenes(args.eval_captions)
    captions = [s.caption() for s in scenes]
    truth = render.render(scenes, args.size)
    metrics = {}
    # The VAE alone: what a perfect diffusion model would score through this decoder.
    x = (truth * 2 - 1).to(device)
    recon = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
    recon = ((recon.float().cpu() + 1) / 2).clamp(0, 1)
    metrics["vae_reconstruction"] = checker.accuracy(checker.check_many(recon, scenes))
    event("eval", what="vae_reconstruction", **metrics["vae_reconstruction"])
    grids = [truth[:16].permute(0, 2, 3, 1).numpy(), recon[:16].permute(0, 2, 3, 1).numpy()]
    for g in (float(v) for v in args.eval_guidance.split(",") if v.strip()):
        start = time.perf_counter()
        images = generate(pipe, captions, steps=args.eval_steps, guidance=g, seed=EVAL_SEED)
        seconds = time.perf_counter() - start
        acc = checker.accuracy(checker.check_many(images, scenes))
        metrics[f"guidance_{g:g}"] = acc
        event("eval", what="generated", guidance_scale=g, steps=args.eval_steps,
              seconds=round(seconds, 2), **acc)
        grids.append(images[:16])
    write_grid(np.stack(grids), work / "samples")
    (work / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics


def write_grid(rows: np.ndarray, stem: Path) -> Path:
    """``rows [R, C, H, W, 3]`` in [0, 1] -> one image (rows: truth, VAE, each guidance)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    r, c, h, w, _ = rows.shape
    grid = (np.clip(rows, 0, 1) * 255).round().astype(np.uint8)
    grid = grid.transpose(0, 2, 1, 3, 4).reshape(r * h, c * w, 3)
    try:
        from PIL import Image
    except ImportError:
        path = stem.with_suffix(".npy")
        np.save(path, grid)
    else:
        path = stem.with_suffix(".png")
        Image.fromarray(grid).resize((c * w * 2, r * h * 2), Image.NEAREST).save(path)
    log(f"wrote {path} (rows: rendered truth, VAE reconstruction, generated per guidance)")
    return path


def quiet_libraries() -> None:
    """No progress bars from diffusers / transformers in the training log."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    trainer = Trainer(args)
    params = {n: model.num_parameters(getattr(trainer, n)) for n in ("vae", "unet", "text")}
    event("start", device=str(trainer.device), torch=torch.__version__, minutes=args.minutes,
          vae_seconds=round(trainer.vae_budget), unet_seconds=round(trainer.unet_budget),
          batch=args.batch, parameters=params, resume=args.resume)
    if args.resume:
        trainer.load_checkpoint()
    else:
        if trainer.checkpoint_path().exists():
            raise SystemExit(f"{trainer.checkpoint_path()} exists: pass --resume to continue "
                             "it, or another --work folder to start over")
        out = Path(args.out)
        if out.exists() and any(out.iterdir()) and not (out / "model_index.json").is_file():
            raise SystemExit(f"--out {out} is not empty and holds no saved pipeline")
    return trainer.run()


if __name__ == "__main__":
    sys.exit(main())
