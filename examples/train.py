#!/usr/bin/env python
"""Fine-tune (or train from scratch) Mask DINO on a `datasets` data set with Accelerate.

    python examples/train.py --dataset DATA --task instance --tiny --max-steps 200 --output-dir out
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/train.py --dataset DATA ...

(Several CPU processes: `accelerate launch --cpu` always picks its single-process launcher unless mpirun is set up,
so use the torchrun launcher (`--multi_gpu`) with `ACCELERATE_USE_CPU=true`; the processes then use gloo.
`--batch-size` is per process, so the global batch is `num_processes * batch_size * accumulation`.)

`--dataset` is a `save_to_disk` folder (a `DatasetDict` with `train` / `validation` splits) or a folder of COCO-format
split folders (`train/`, `validation/`, read with `maskdino_hf.data.load_coco_folder`), in the column layout of
`maskdino_hf.synthetic` / `maskdino_hf.data` (`objects` for COCO instances, `panoptic` + `segments_info` for COCO
panoptic, `semantic` for label maps).

The recipe is the official one (see `maskdino_hf.training`): large-scale jitter (flip, random scale 0.1-2.0 of
`--image-size`, random crop / pad to an `--image-size` square), AdamW (lr 1e-4, weight decay 0.05, 0 for norms and
embeddings, backbone lr x 0.1), step decay x0.1 at 88.9% and 96.3% of `--max-steps` (optional linear warm-up),
full-model gradient-norm clipping at 0.01, mixed precision through Accelerate. `--ema-decay` (not official) keeps an
exponential moving average of the weights (`torch.optim.swa_utils.AveragedModel`) that is evaluated and saved.

Checkpoints (`--save-every`) are `accelerator.save_state` folders under `OUTPUT_DIR/checkpoints/checkpoint-STEP`
(model, optimizer, scheduler, RNG states, the data position and the weight average), written as `checkpoint-STEP.tmp` and renamed when
complete. `--resume-from PATH|latest` checks the checkpoint first (a truncated file, or a pickled one holding more
than tensors, is refused with its path; `latest` takes the newest good one, skipping unfinished and broken ones) and
continues exactly where it was taken: the sampler is seeded per epoch, the augmentation of image i in epoch e only
depends on (seed, e, i), and the batches already seen in the current epoch are skipped with
`accelerator.skip_first_batches`. Periodic and final evaluation (`maskdino_hf.evaluation.evaluate`) runs on every
process, each on its share of the images.

At the end the model and its image processor are written with `save_pretrained` to `--output-dir`, together with
`metrics.json` (final evaluation, timings) and `log.jsonl` (one line per logged step / evaluation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from tqdm.auto import tqdm

import maskdino_hf  # noqa: F401  (registers the Auto classes)
from maskdino_hf import MaskDINOConfig, MaskDINOForUniversalSegmentation, MaskDINOImageProcessor
from maskdino_hf.evaluation import evaluate, label_to_category_mapping
from maskdino_hf.predict import keep_freed_memory, slow_bfloat16_reason
from maskdino_hf.releases import card_metrics, upload_folder, write_model_card
from maskdino_hf.training import (
    OFFICIAL_CLIP_VALUE,
    OFFICIAL_STEP_FRACTIONS,
    BatchInvariantRandomSource,
    CheckpointError,
    MaskDINOTrainCollator,
    MaskDINOTrainDataset,
    build_optimizer,
    build_scheduler,
    dataset_categories,
    load_dataset_splits,
    resume_checkpoint,
    save_checkpoint,
    tiny_config,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", required=True, help="save_to_disk folder or folder of COCO split folders")
    data.add_argument("--task", choices=("instance", "panoptic", "semantic"), default="instance")
    data.add_argument("--train-split", default="train")
    data.add_argument("--eval-split", default="validation", help="'' or 'none' disables evaluation")
    data.add_argument("--max-eval-images", type=int, default=None)
    data.add_argument("--image-size", type=int, default=1024, help="LSJ square training size (official 1024)")
    data.add_argument("--min-scale", type=float, default=0.1)
    data.add_argument("--max-scale", type=float, default=2.0)
    data.add_argument("--no-flip", action="store_true")
    data.add_argument("--no-augment", action="store_true", help="no LSJ: resize with the processor's test rule")
    data.add_argument("--eval-size", type=int, default=None, help="test shortest edge (default: --image-size)")
    data.add_argument("--eval-max-size", type=int, default=None, help="test longest edge (default: 1333/800 x)")
    data.add_argument("--num-workers", type=int, default=0)

    model = p.add_argument_group("model")
    source = model.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model folder (or Hub id) to fine-tune")
    source.add_argument("--config-json", help="MaskDINOConfig json (or folder) to train from scratch")
    source.add_argument("--tiny", action="store_true", help="built-in tiny configuration, from scratch")
    model.add_argument("--id2label", help="JSON file or inline JSON {id: name}: new class set (resizes the heads)")
    model.add_argument("--stuff-labels", help="comma-separated stuff label ids (default: categories with isthing=0)")
    model.add_argument("--config-overrides", default=None, help='JSON dict of config fields, e.g. {"num_queries": 50}')
    model.add_argument("--processor-overrides", default=None,
                       help='JSON dict of image-processor (post-processing) settings, e.g. {"test_topk_per_image": 30}')
    model.add_argument("--detection-only", action="store_true", help="boxes without masks: no mask loss terms")
    model.add_argument("--gradient-checkpointing", action="store_true")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    opt.add_argument("--batch-size", type=int, default=2, help="images per process per micro-batch")
    opt.add_argument("--gradient-accumulation-steps", type=int, default=1)
    opt.add_argument("--lr", type=float, default=1e-4)
    opt.add_argument("--weight-decay", type=float, default=0.05)
    opt.add_argument("--backbone-multiplier", type=float, default=0.1)
    opt.add_argument("--lr-steps", default=",".join(f"{f:.4f}" for f in OFFICIAL_STEP_FRACTIONS),
                     help="fractions of --max-steps where the lr is multiplied by --gamma")
    opt.add_argument("--gamma", type=float, default=0.1)
    opt.add_argument("--schedule-by-time", action="store_true",
                     help="with --max-train-minutes: the lr milestones are fractions of the wall-time budget (or of "
                          "--max-steps, whichever is reached first) instead of --max-steps alone, so a run stopped "
                          "by its time limit still gets its lr decay (not exactly reproducible on resume)")
    opt.add_argument("--warmup-steps", type=int, default=0)
    opt.add_argument("--warmup-factor", type=float, default=1.0, help="official 1.0 = no warm-up")
    opt.add_argument("--clip-grad", type=float, default=OFFICIAL_CLIP_VALUE, help="full-model L2 clip (0: off)")
    opt.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    opt.add_argument("--ema-decay", type=float, default=0.0,
                     help="keep an exponential moving average of the weights with this decay (e.g. 0.999); it is "
                          "evaluated and saved instead of the last weights (0: off)")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--batch-invariant-draws", action="store_true",
                     help="testing only: model/loss random draws independent of the batch split")

    run = p.add_argument_group("run")
    run.add_argument("--output-dir", required=True)
    run.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    run.add_argument("--push-to-hub", metavar="REPO_ID",
                     help="upload the saved model, processor and model card (README.md) to this Hub repository")
    run.add_argument("--checkpoints-total-limit", type=int, default=None)
    run.add_argument("--resume-from", default=None, help="checkpoint folder or 'latest'")
    run.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    run.add_argument("--eval-at-start", action="store_true", help="also evaluate before the first step")
    run.add_argument("--eval-batch-size", type=int, default=4)
    run.add_argument("--no-final-eval", action="store_true")
    run.add_argument("--log-every", type=int, default=1)
    run.add_argument("--max-train-minutes", type=float, default=None, help="stop (and save) after this wall time")
    run.add_argument("--max-train-cpu-minutes", type=float, default=None,
                     help="stop (and save) once this process has used this much CPU time (all threads)")
    run.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.eval_split and args.eval_split.lower() == "none":
        args.eval_split = ""
    if not 0.0 <= args.ema_decay < 1.0:
        p.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    return args


# ----------------------------------------------------------------------------------------------------------------


def _json_arg(text: str | None):
    if text is None:
        return None
    if text.lstrip().startswith("{"):
        return json.loads(text)
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    return json.loads(path.read_text())


def resolve_labels(args, categories: list[dict], model_id2label: dict[int, str] | None):
    """(id2label, category_id_to_label, stuff_labels) for the run; categories map to labels by
    `evaluation.label_to_category_mapping`, the rule evaluation uses too."""
    if args.id2label:
        id2label = {int(k): str(v) for k, v in _json_arg(args.id2label).items()}
    elif model_id2label is not None:
        id2label = {int(k): str(v) for k, v in model_id2label.items()}
    else:
        contiguous = [int(c["id"]) for c in categories] == list(range(len(categories)))
        id2label = {int(c["id"]) if contiguous else i: str(c["name"]) for i, c in enumerate(categories)}
    try:
        label_to_category = label_to_category_mapping(id2label, categories)
    except ValueError as error:
        _fail(f"{error}: pass --id2label with the data set's names")
    category_id_to_label = {category: label for label, category in label_to_category.items()}
    if args.stuff_labels is not None:
        stuff = [int(v) for v in args.stuff_labels.split(",") if v.strip()]
    else:
        stuff = sorted(category_id_to_label[int(c["id"])] for c in categories
                       if not c.get("isthing", 1) and int(c["id"]) in category_id_to_label)
    return id2label, category_id_to_label, stuff


def build_model(args, categories):
    overrides = _json_arg(args.config_overrides) or {}
    if args.model:
        config = MaskDINOConfig.from_pretrained(args.model)
        id2label, cat2label, stuff = resolve_labels(args, categories, None if args.id2label else config.id2label)
        values = dict(overrides)
        if args.id2label:
            values.update(num_labels=len(id2label), id2label=id2label,
                          label2id={v: k for k, v in id2label.items()}, stuff_labels=stuff)
        if values:  # rebuild the config at once (fields are validated together)
            merged = config.to_dict()
            for key in ("architectures", "transformers_version", "model_type", "auto_map"):
                merged.pop(key, None)
            merged.update(values)
            config = MaskDINOConfig(**merged)
        model = MaskDINOForUniversalSegmentation.from_pretrained(args.model, config=config, ignore_mismatched_sizes=True)
    else:
        id2label, cat2label, stuff = resolve_labels(args, categories, None)
        labels = dict(num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()},
                      stuff_labels=stuff)
        if args.tiny:
            config = tiny_config(**labels, **overrides)
        else:
            values = _json_arg(args.config_json)
            values = {k: v for k, v in values.items() if k not in ("architectures", "transformers_version", "model_type")}
            values.update(labels)
            values.update(overrides)
            config = MaskDINOConfig(**values)
        model = MaskDINOForUniversalSegmentation(config)
    if args.detection_only:
        # MaskDINOLoss always computes the mask terms; with zero weights (loss and matching cost) they do not
        # contribute, and "det" denoising has no mask terms (see the project report for a proper skip).
        for name in ("mask_weight", "dice_weight", "cost_mask_weight", "cost_dice_weight"):
            setattr(model.config, name, 0.0)
        if model.config.denoising == "seg":
            model.config.denoising = "det"
        model.config.train_num_points = min(model.config.train_num_points, 16)
    label_to_category = {label: category for category, label in cat2label.items()}
    return model, cat2label, label_to_category


def build_processor(args, model):
    if args.model:
        try:
            processor = MaskDINOImageProcessor.from_pretrained(args.model)
        except (OSError, ValueError):
            processor = None
    else:
        processor = None
    eval_size = args.eval_size or args.image_size
    eval_max = args.eval_max_size or int(round(eval_size * 1333 / 800))
    config = model.config
    # Post-processing settings are the processor's (its defaults, or those of the loaded --model processor).
    settings = dict(
        size={"shortest_edge": eval_size, "longest_edge": eval_max},
        num_labels=config.num_labels,
        stuff_labels=list(config.stuff_labels),
        instance_on=args.task in ("instance", "panoptic"),
        panoptic_on=args.task == "panoptic",
        semantic_on=args.task == "semantic",
    )
    overrides = json.loads(args.processor_overrides) if args.processor_overrides else {}
    unknown = sorted(key for key in overrides if not hasattr(MaskDINOImageProcessor(), key))
    if unknown:
        _fail(f"--processor-overrides: unknown image-processor settings {unknown}")
    settings.update(overrides)
    if processor is None:
        return MaskDINOImageProcessor(**settings)
    for key, value in settings.items():
        if key == "size" and not args.eval_size:
            continue
        setattr(processor, key, value)
    return processor


def build_time_scheduler(optimizer, args, fractions, elapsed_seconds):
    """Like `build_scheduler`, but the progress at step `s` is `max(s / max_steps, elapsed / time budget)`: the lr is
    multiplied by `gamma` at each fraction of `fractions` of whichever budget runs out first (linear warm-up over the
    first `--warmup-steps` steps as usual)."""
    budget = 60.0 * args.max_train_minutes
    fractions = sorted(fractions)

    def factor(step: int) -> float:
        progress = max(step / max(args.max_steps, 1), elapsed_seconds() / budget)
        decay = args.gamma ** sum(progress >= fraction for fraction in fractions)
        if args.warmup_steps > 0 and step < args.warmup_steps:
            alpha = step / args.warmup_steps
            decay *= args.warmup_factor * (1 - alpha) + alpha
        return decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class TrainingState:
    """Counters saved with every checkpoint (`accelerator.register_for_checkpointing`)."""

    def __init__(self):
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.train_seconds = 0.0

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        for key, value in state.items():
            setattr(self, key, value)


class EpochSampler(torch.utils.data.Sampler):
    """Random permutation seeded by (seed, epoch): the same order in every process and after a resume."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def __len__(self):
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


def _fail(message: str):
    """Stop with one line on stderr and exit status 2 (a mistake in the arguments or the files they name)."""
    print(f"train.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_data(args):
    """(train split, evaluation split or None, categories)."""
    try:
        splits = load_dataset_splits(args.dataset)
    except (FileNotFoundError, ValueError, KeyError) as error:
        _fail(f"--dataset {args.dataset}: {error}")
    if args.train_split not in splits:
        _fail(f"split {args.train_split!r} not in {list(splits)}")
    eval_data = splits[args.eval_split] if args.eval_split and args.eval_split in splits else None
    if eval_data is not None and args.max_eval_images:
        eval_data = eval_data.select(range(min(args.max_eval_images, len(eval_data))))
    return splits[args.train_split], eval_data, dataset_categories(splits, args.dataset, args.train_split)


def build_loader(args, train_data, processor, category_id_to_label):
    """The augmenting data set, its per-epoch sampler and the data loader."""
    dataset = MaskDINOTrainDataset(
        train_data, args.task, None if args.no_augment else args.image_size, category_id_to_label,
        args.min_scale, args.max_scale, not args.no_flip, args.seed, args.detection_only,
    )
    sampler = EpochSampler(len(dataset), args.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True, num_workers=args.num_workers,
        collate_fn=MaskDINOTrainCollator(processor, resize=args.no_augment),
        # Its own generator: creating an iterator draws a worker base seed, which must not consume the global RNG
        # (the model's random draws), or a resumed run (new iterator after load_state) would drift.
        generator=torch.Generator().manual_seed(args.seed),
    )
    return dataset, sampler, loader


def build_schedule(args, optimizer, state):
    fractions = [float(v) for v in args.lr_steps.split(",") if v.strip()]
    if args.schedule_by_time and args.max_train_minutes:
        return build_time_scheduler(optimizer, args, fractions, lambda: state.train_seconds)
    return build_scheduler(optimizer, args.max_steps, fractions, args.gamma, args.warmup_steps, args.warmup_factor)


def resume_or_seed(args, accelerator, checkpoints: Path, state) -> None:
    """Load `--resume-from` (a checked checkpoint, `latest` = the newest good one), or seed a fresh run."""
    if not args.resume_from:
        set_seed(args.seed + accelerator.process_index)  # training draws differ between processes
        return
    try:
        resume = resume_checkpoint(args.resume_from, checkpoints)
    except (CheckpointError, FileNotFoundError) as error:
        _fail(f"--resume-from {args.resume_from}: {error}")
    accelerator.load_state(str(resume))
    accelerator.print(f"resumed from {resume} at step {state.global_step}")


class Run:
    """What the training loop shares: the prepared objects, the arguments and the log."""

    def __init__(self, args, accelerator, model, processor, optimizer, scheduler, state, eval_data, categories,
                 label_to_category, ema: AveragedModel | None = None):
        self.args, self.accelerator, self.model, self.processor = args, accelerator, model, processor
        self.ema = ema
        self.optimizer, self.scheduler, self.state = optimizer, scheduler, state
        self.eval_data, self.categories, self.label_to_category = eval_data, categories, label_to_category
        self.output_dir = Path(args.output_dir)
        self.random_source = BatchInvariantRandomSource(args.seed) if args.batch_invariant_draws else None

    def weights(self) -> MaskDINOForUniversalSegmentation:
        """The model that is evaluated and saved: the weight average with `--ema-decay`, else the trained model."""
        return self.ema.module if self.ema is not None else self.accelerator.unwrap_model(self.model)

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.output_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate(self, step: int) -> dict:
        """Held-out metrics through `evaluation.evaluate`, every process taking its share of the images."""
        if self.eval_data is None:
            return {}
        args, start = self.args, time.time()
        tasks = {"instance": ["instance"], "panoptic": ["instance", "panoptic"], "semantic": ["semantic"]}[args.task]
        metrics = evaluate(
            self.weights(), self.processor, self.eval_data,
            ["detection"] if args.detection_only else tasks, categories=self.categories,
            label_to_category=self.label_to_category, batch_size=args.eval_batch_size,
            bf16=args.mixed_precision == "bf16" and self.accelerator.device.type == "cuda",
            per_category=False, progress=not args.no_progress,
        )
        self.log({"step": step, "eval": metrics, "eval_seconds": round(time.time() - start, 2)})
        headline = {k: round(v, 4) for k, v in metrics.items() if k in ("segm_AP", "bbox_AP", "PQ", "mIoU")}
        self.accelerator.print(f"step {step}: eval {headline}")
        return metrics

    def after_step(self, loss_window: list, grad_norm) -> bool:
        """Log, checkpoint and evaluate after an optimizer step; `True` when the run must stop."""
        args, state, accelerator = self.args, self.state, self.accelerator
        if state.global_step % args.log_every == 0 or state.global_step == args.max_steps:
            mean_loss = accelerator.reduce(torch.stack(loss_window).mean(), reduction="mean").item()
            record = {"step": state.global_step, "epoch": state.epoch, "loss": mean_loss,
                      "lr": max(group["lr"] for group in self.optimizer.param_groups),
                      "seconds": round(state.train_seconds, 2)}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            self.log(record)
        if args.save_every and state.global_step % args.save_every == 0:
            save_checkpoint(accelerator, self.output_dir / "checkpoints", state.global_step, args.checkpoints_total_limit)
        if args.eval_every and state.global_step % args.eval_every == 0 and state.global_step < args.max_steps:
            self.evaluate(state.global_step)
            self.model.train()
        if state.global_step >= args.max_steps:
            return True
        if args.max_train_minutes and state.train_seconds > 60 * args.max_train_minutes:
            accelerator.print(f"time limit reached at step {state.global_step}")
            return True
        if args.max_train_cpu_minutes and time.process_time() > 60 * args.max_train_cpu_minutes:
            accelerator.print(f"CPU-time limit reached at step {state.global_step}")
            return True
        return False


def train_loop(run: Run, loader, sampler, dataset) -> None:
    """Optimizer steps until `--max-steps` or a time limit; epochs resume at the batch the checkpoint was taken."""
    args, state, accelerator, model = run.args, run.state, run.accelerator, run.model
    model.train()
    progress = tqdm(total=args.max_steps, initial=state.global_step, desc="train",
                    disable=not accelerator.is_main_process or args.no_progress, dynamic_ncols=True)
    start_time, start_seconds = time.time(), state.train_seconds
    losses: list[torch.Tensor] = []
    stop = state.global_step >= args.max_steps
    while not stop:
        sampler.set_epoch(state.epoch)
        dataset.set_epoch(state.epoch)
        skip = state.batches_in_epoch
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            batch.pop("indices", None)
            state.batches_in_epoch += 1
            with accelerator.accumulate(model):
                loss = model(**batch, random_source=run.random_source).loss
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and args.clip_grad > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
            if not accelerator.sync_gradients:
                continue
            if run.ema is not None:
                run.ema.update_parameters(accelerator.unwrap_model(model))
            state.train_seconds = start_seconds + (time.time() - start_time)
            run.scheduler.step()
            state.global_step += 1
            progress.update(1)
            stop = run.after_step(losses, grad_norm)
            losses = []
            if stop:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
    progress.close()


def save_final(run: Run, metrics: dict) -> None:
    """The model and processor (`save_pretrained`) and `metrics.json`, written by the main process."""
    accelerator, args = run.accelerator, run.args
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run.weights().save_pretrained(run.output_dir, safe_serialization=True)
        run.processor.save_pretrained(run.output_dir)
        summary = {"steps": run.state.global_step, "train_seconds": round(run.state.train_seconds, 1),
                   "process_cpu_seconds": round(time.process_time(), 1), "eval": metrics,
                   "args": vars(args), "num_processes": accelerator.num_processes}
        (run.output_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
        base_model = args.model if args.model and not Path(args.model).exists() else None  # Hub ids only
        write_model_card(run.output_dir, model_id=args.push_to_hub or run.output_dir.name, task=args.task,
                         metrics=card_metrics(metrics), base_model=base_model)
        if args.push_to_hub:
            upload_folder(run.output_dir, args.push_to_hub, commit_message=f"Mask DINO fine-tuned for {args.task}")
    accelerator.wait_for_everyone()


def main(argv=None) -> dict:
    args = parse_args(argv)
    keep_freed_memory()  # CPU steps reuse freed memory instead of faulting in fresh pages (see its docstring)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    slow_bf16 = slow_bfloat16_reason(accelerator.device.type) if args.mixed_precision == "bf16" else None
    if slow_bf16 is not None:
        accelerator.print(f"warning: --mixed-precision bf16 will be slow: {slow_bf16}; float32 is faster here")
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    train_data, eval_data, categories = load_data(args)
    set_seed(args.seed)  # identical initialisation everywhere
    model, category_id_to_label, label_to_category = build_model(args, categories)
    processor = build_processor(args, model)
    if args.gradient_checkpointing:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    dataset, sampler, loader = build_loader(args, train_data, processor, category_id_to_label)
    optimizer = build_optimizer(model, args.lr, args.weight_decay, args.backbone_multiplier)
    state = TrainingState()
    scheduler = build_schedule(args, optimizer, state)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_for_checkpointing(state)
    ema = None
    if args.ema_decay:
        ema = AveragedModel(accelerator.unwrap_model(model), multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay),
                            use_buffers=True)
        accelerator.register_for_checkpointing(ema)
    if len(loader) == 0:
        _fail(f"the training split has {len(dataset)} images: fewer than one batch per process")
    resume_or_seed(args, accelerator, Path(args.output_dir) / "checkpoints", state)
    run = Run(args, accelerator, model, processor, optimizer, scheduler, state, eval_data, categories,
              label_to_category, ema)
    if args.eval_at_start and state.global_step == 0:
        run.evaluate(0)
    train_loop(run, loader, sampler, dataset)
    metrics = {} if args.no_final_eval else run.evaluate(state.global_step)
    save_final(run, metrics)
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
