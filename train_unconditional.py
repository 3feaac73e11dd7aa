#!/usr/bin/env python
"""Train an unconditional diffusion model (a DDPM `UNet2DModel` from scratch) on a folder or dataset of images.

A drop-in replacement for diffusers' `examples/unconditional_image_generation/train_unconditional.py`: the same
flags and defaults, the same output layout (a `DDPMPipeline` folder in `--output_dir`, `checkpoint-N/` folders), plus
`--seed`, `--max_train_steps`, `--config`, exact resume, atomic checkpoints and preemption handling.

    accelerate launch train_unconditional.py --train_data_dir ./images --resolution 64 --output_dir ddpm-64
"""

import math
import os
from datetime import timedelta

import numpy as np
import torch
from PIL import Image

from trainkit import checkpointing, cli, distributed, objectives, randomness
from trainkit.cli import InputError

# Independent random streams, derived from the run seed (see randomness.derive_seed).
SHUFFLE_STREAM, AUGMENT_STREAM, NOISE_STREAM = 1, 2, 3
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = cli.ArgumentParser(description="Train an unconditional DDPM on a set of images.")
    add = parser.add_argument
    # Data (upstream)
    add("--dataset_name", type=str, default=None,
        help="A dataset on the hub, or a local dataset folder (parquet/arrow/imagefolder/save_to_disk).")
    add("--dataset_config_name", type=str, default=None, help="The dataset's config, if it has several.")
    add("--train_data_dir", type=str, default=None,
        help="A folder of images (any depth). Ignored if --dataset_name is given.")
    add("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are stored.")
    add("--resolution", type=int, default=64, help="Images are resized and cropped to this square size.")
    add("--center_crop", action="store_true", help="Crop the centre instead of a random square.")
    add("--random_flip", action="store_true", help="Flip images horizontally at random.")
    add("--preserve_input_precision", action="store_true",
        help="Keep 16/32-bit image precision instead of converting to 8-bit RGB (grey images become 3 channels).")
    add("--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses; 0 loads in the main one.")
    # Model (upstream)
    add("--model_config_name_or_path", type=str, default=None,
        help="A UNet2DModel config: a config.json, a folder holding one, or a hub id. Default: the upstream UNet.")
    add("--prediction_type", type=str, default="epsilon", choices=["epsilon", "sample"],
        help="Whether the model predicts the noise (epsilon) or the clean image (sample).")
    add("--ddpm_num_steps", type=int, default=1000)
    add("--ddpm_num_inference_steps", type=int, default=1000)
    add("--ddpm_beta_schedule", type=str, default="linear")
    add("--enable_xformers_memory_efficient_attention", action="store_true", help="Use xformers attention.")
    # Training (upstream)
    add("--output_dir", type=str, default="ddpm-model-64", help="Where the model, samples and checkpoints go.")
    add("--overwrite_output_dir", action="store_true")
    add("--train_batch_size", type=int, default=16, help="Batch size per device.")
    add("--eval_batch_size", type=int, default=16, help="How many images each sample grid holds.")
    add("--num_epochs", type=int, default=100)
    add("--save_images_epochs", type=int, default=10, help="Save a sample grid every N epochs.")
    add("--save_model_epochs", type=int, default=10, help="Save the pipeline to --output_dir every N epochs.")
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--learning_rate", type=float, default=1e-4)
    add("--lr_scheduler", type=str, default="cosine", help=f"One of {', '.join(LR_SCHEDULERS)}.")
    add("--lr_warmup_steps", type=int, default=500)
    add("--adam_beta1", type=float, default=0.95)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_weight_decay", type=float, default=1e-6)
    add("--adam_epsilon", type=float, default=1e-08)
    add("--use_ema", action="store_true", help="Keep an exponential moving average of the weights; it is saved.")
    add("--ema_inv_gamma", type=float, default=1.0)
    add("--ema_power", type=float, default=3 / 4)
    add("--ema_max_decay", type=float, default=0.9999)
    add("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    add("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N optimizer steps.")
    add("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    add("--resume_from_checkpoint", type=str, default=None,
        help="A checkpoint-N folder (name in --output_dir, or path) or 'latest' to continue training from.")
    # Logging and hub (upstream)
    add("--logger", type=str, default="tensorboard", choices=["tensorboard", "wandb"])
    add("--logging_dir", type=str, default="logs", help="TensorBoard folder, relative to --output_dir.")
    add("--push_to_hub", action="store_true")
    add("--hub_token", type=str, default=None)
    add("--hub_model_id", type=str, default=None)
    add("--hub_private_repo", action="store_true")
    add("--local_rank", type=int, default=-1, help="Set by the launcher; not needed with accelerate launch.")
    # Additions
    add("--seed", type=int, default=None, help="Seed for initialisation, data order, augmentation and noise.")
    add("--max_train_steps", type=int, default=None, help="Stop after this many optimizer steps (overrides epochs).")
    add("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    add("--image_column", type=str, default="image", help="The dataset column that holds the images.")
    add("--logging_steps", type=int, default=10,
        help="Log the mean loss every N optimizer steps (the loss is not read back from the device in between).")
    return cli.parse_args_with_config(parser, argv)


def validate_args(args):
    """Every check that needs no model or dataset loaded. Raises InputError."""
    cli.require_positive(
        args, "resolution", "train_batch_size", "eval_batch_size", "num_epochs", "save_images_epochs",
        "save_model_epochs", "gradient_accumulation_steps", "learning_rate", "checkpointing_steps",
        "checkpoints_total_limit", "max_train_steps", "ddpm_num_steps", "ddpm_num_inference_steps", "logging_steps",
    )
    if args.lr_warmup_steps < 0:
        raise InputError(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps}")
    if args.dataloader_num_workers < 0:
        raise InputError(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}")
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise InputError(f"--lr_scheduler {args.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
    if args.ddpm_beta_schedule not in BETA_SCHEDULES:
        raise InputError(f"--ddpm_beta_schedule {args.ddpm_beta_schedule!r} is not one of {', '.join(BETA_SCHEDULES)}")

    if args.dataset_name is None and args.train_data_dir is None:
        raise InputError(
            "give --dataset_name (a hub id or a local dataset folder) or --train_data_dir (a folder of images)"
        )
    if args.dataset_name is not None:
        cli.check_local_or_hub_id("--dataset_name", args.dataset_name)
    elif not os.path.isdir(args.train_data_dir):
        raise InputError(f"--train_data_dir {args.train_data_dir!r} is not a folder")
    elif not any(cli.image_files(args.train_data_dir)):
        extensions = ", ".join(cli.IMAGE_EXTENSIONS)
        raise InputError(f"--train_data_dir {args.train_data_dir!r} holds no images ({extensions})")
    if args.model_config_name_or_path is not None:
        path = args.model_config_name_or_path
        cli.check_local_or_hub_id("--model_config_name_or_path", path)
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise InputError(f"--model_config_name_or_path {path!r} is a folder without a config.json")

    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise InputError(f"--output_dir {args.output_dir!r} exists and is not a folder")
    args.resume_path = checkpointing.resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)

    if args.logger == "wandb":
        if args.hub_token is not None:
            raise InputError(
                "--logger wandb with --hub_token would expose the token in the wandb run; use `hf auth login` instead"
            )
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise InputError("--logger wandb needs the wandb package: pip install wandb") from None
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available():
            raise InputError(
                "--enable_xformers_memory_efficient_attention: xformers is not installed "
                "(pip install -r requirements-xformers.txt)"
            )


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def load_images_dataset(args):
    """The training images as a datasets.Dataset with one column, `args.image_column`; unreadable images removed."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    if args.dataset_name:
        flag, source = "--dataset_name", args.dataset_name
    else:
        flag, source = "--train_data_dir", args.train_data_dir
    try:
        if args.dataset_name is None:
            dataset = load_dataset("imagefolder", data_dir=source, cache_dir=args.cache_dir, split="train")
        elif any(os.path.isfile(os.path.join(source, name)) for name in ("state.json", "dataset_dict.json")):
            dataset = load_from_disk(source)
        else:
            dataset = load_dataset(source, args.dataset_config_name, cache_dir=args.cache_dir, split="train")
    except Exception as error:  # datasets raises many types; the user needs the source and the reason
        raise InputError(f"{flag} {source!r}: cannot load the dataset ({cli.first_line(error)})") from None
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise InputError(f"{flag} {source!r} has no 'train' split (splits: {', '.join(dataset)})")
        dataset = dataset["train"]
    assert isinstance(dataset, Dataset)
    if args.image_column not in dataset.column_names:
        columns = ", ".join(dataset.column_names)
        raise InputError(f"--image_column {args.image_column!r} is not a column of {source!r}; columns: {columns}")
    dataset = dataset.select_columns([args.image_column])
    if len(dataset) == 0:
        raise InputError(f"{flag} {source!r} holds no images")
    return cli.drop_unreadable_images(dataset, args.image_column, flag, source)


def preprocess_image(image, resolution, center_crop, random_flip, preserve_precision, generator):
    """PIL image -> (3, resolution, resolution) float tensor in [-1, 1]: resize the short side (bilinear), crop,
    maybe flip. Random choices come from `generator` so that they are reproducible per sample and epoch."""
    high_precision = preserve_precision and image.mode in ("I", "I;16", "I;16B", "I;16L", "F")
    if high_precision:
        scale = 1.0 if image.mode == "F" else 65535.0
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) / scale, 0.0, 1.0))  # mode F
    else:
        image = image.convert("RGB")

    width, height = image.size
    short = min(width, height)
    size = (max(resolution, round(width * resolution / short)), max(resolution, round(height * resolution / short)))
    image = image.resize(size, resample=Image.BILINEAR)
    width, height = image.size
    if center_crop:
        left, top = round((width - resolution) / 2), round((height - resolution) / 2)
    else:
        left = int(torch.randint(0, width - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, height - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and torch.rand(1, generator=generator).item() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)

    array = np.asarray(image, dtype=np.float32)
    if high_precision:
        pixels = torch.from_numpy(array.copy())[None].expand(3, -1, -1)
    else:
        pixels = torch.from_numpy(array / 255.0).permute(2, 0, 1)
    return (pixels * 2.0 - 1.0).contiguous()


class TrainImages(torch.utils.data.Dataset):
    """Indexed by (epoch, index) from randomness.EpochSampler; augmentation randomness depends only on the run seed,
    the epoch and the sample index, so it is the same on resume and with any number of workers."""

    def __init__(self, images, column, args, run_state):
        self.images, self.column, self.args, self.run_state = images, column, args, run_state

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        epoch, index = key
        generator = randomness.make_generator("cpu", self.run_state.seed, AUGMENT_STREAM, epoch, index)
        a, image = self.args, self.images[index][self.column]
        return {"input": preprocess_image(
            image, a.resolution, a.center_crop, a.random_flip, a.preserve_input_precision, generator
        )}


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


def build_unet(args):
    from diffusers import UNet2DModel

    if args.model_config_name_or_path is not None:
        try:
            config = UNet2DModel.load_config(args.model_config_name_or_path, cache_dir=args.cache_dir)
        except Exception as error:
            path, reason = args.model_config_name_or_path, cli.first_line(error)
            raise InputError(f"--model_config_name_or_path {path!r}: cannot load ({reason})") from None
        return UNet2DModel.from_config(config)
    # The upstream default: a 6-level UNet with attention at 1/16 resolution.
    return UNet2DModel(
        sample_size=args.resolution,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Samples, saving, model card
# ----------------------------------------------------------------------------------------------------------------------


def generate_sample_grid(accelerator, unet, noise_scheduler, args):
    """Denoise `--eval_batch_size` images, split across all ranks (no rank idles past a collective timeout).
    Image i always comes from seed i, so the grid does not depend on the number of processes. Main process gets the
    images as uint8 arrays, other ranks None."""
    from accelerate.utils import gather_object
    from diffusers import DDPMPipeline, DDPMScheduler

    mine = list(range(accelerator.process_index, args.eval_batch_size, accelerator.num_processes))
    images = []
    if mine:
        pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(noise_scheduler.config))
        pipeline.set_progress_bar_config(disable=True)
        generators = [torch.Generator(device="cpu").manual_seed(i) for i in mine]
        unet.eval()
        with torch.no_grad():
            output = pipeline(
                batch_size=len(mine),
                generator=generators,
                num_inference_steps=args.ddpm_num_inference_steps,
                output_type="np",
            ).images
        unet.train()
        images = [(i, (image * 255).round().astype("uint8")) for i, image in zip(mine, output)]
    gathered = gather_object(images) if accelerator.num_processes > 1 else images
    if not accelerator.is_main_process:
        return None
    return [image for _, image in sorted(gathered, key=lambda pair: pair[0])]


def save_sample_grid(accelerator, images, epoch, global_step, args):
    from diffusers.utils import make_image_grid

    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    tiles = [Image.fromarray(image) for image in images]
    tiles += [Image.new("RGB", tiles[0].size)] * (rows * columns - len(tiles))
    samples_dir = os.path.join(args.output_dir, "samples")
    os.makedirs(samples_dir, exist_ok=True)
    path = os.path.join(samples_dir, f"epoch_{epoch:04d}.png")
    make_image_grid(tiles, rows, columns).save(path)

    batch = np.stack(images)
    if args.logger == "tensorboard":
        accelerator.get_tracker("tensorboard").writer.add_images("test_samples", batch, epoch, dataformats="NHWC")
    else:
        import wandb

        accelerator.get_tracker("wandb").log(
            {"test_samples": [wandb.Image(image) for image in images], "epoch": epoch}, step=global_step
        )
    return path


def save_pipeline(unet, ema_unet, noise_scheduler, args, global_step):
    """Write the DDPMPipeline (EMA weights when --use_ema) and its model card to --output_dir."""
    from diffusers import DDPMPipeline

    if ema_unet is not None:
        ema_unet.store(unet.parameters())
        ema_unet.copy_to(unet.parameters())
    DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(args.output_dir)
    if ema_unet is not None:
        ema_unet.restore(unet.parameters())
    write_model_card(args, global_step)


def write_model_card(args, global_step):
    from huggingface_hub import ModelCard, ModelCardData

    data = args.dataset_name or args.train_data_dir
    description = f"""
# DDPM trained with train_unconditional.py

An unconditional image generation model (`UNet2DModel` + `DDPMScheduler`) trained from scratch on `{data}` at
{args.resolution}x{args.resolution} for {global_step} optimizer steps.

```python
from diffusers import DDPMPipeline

pipeline = DDPMPipeline.from_pretrained("{args.hub_model_id or args.output_dir}")
image = pipeline(num_inference_steps={args.ddpm_num_inference_steps}).images[0]
```

## Training

| setting | value |
|---|---|
| prediction type | {args.prediction_type} |
| weights | {"EMA (max decay " + str(args.ema_max_decay) + ")" if args.use_ema else "raw"} |
| batch size per device x accumulation | {args.train_batch_size} x {args.gradient_accumulation_steps} |
| learning rate, scheduler, warmup | {args.learning_rate}, {args.lr_scheduler}, {args.lr_warmup_steps} |
| mixed precision | {args.mixed_precision} |
| seed | {args.seed} |

Sample grids written during training are in `samples/`.
"""
    card_data = ModelCardData(library_name="diffusers", tags=["diffusers", "unconditional-image-generation", "ddpm"])
    card = ModelCard.from_template(card_data, template_str="---\n{{ card_data }}\n---\n{{ model_description }}",
                                   model_description=description)
    card.save(os.path.join(args.output_dir, "README.md"))


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    validate_args(args)

    import datasets
    import diffusers
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, compute_snr
    from tqdm.auto import tqdm

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.logger,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        # Sample generation and saving run between steps; give them far more than the default collective timeout.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=7200))],
    )
    import logging

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger = get_logger(__name__, log_level="INFO")
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    distributed.adopt_engine_settings(accelerator, args.train_batch_size, args.max_grad_norm, supports_zero3=True)
    preemption = checkpointing.PreemptionHandler(accelerator)

    run_state = randomness.RunState(randomness.run_seed(args, accelerator))
    accelerator.register_for_checkpointing(run_state)
    set_seed(run_state.seed)

    # Data first: a bad dataset is reported before any model is built or anything is written.
    with accelerator.main_process_first():
        images = load_images_dataset(args)
    train_dataset = TrainImages(images, args.image_column, args, run_state)
    epoch_sampler = randomness.EpochSampler(len(train_dataset), run_state, SHUFFLE_STREAM)
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        sampler=epoch_sampler,
        num_workers=args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )

    model = build_unet(args)
    if args.enable_xformers_memory_efficient_attention:
        model.enable_xformers_memory_efficient_attention()
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=args.ddpm_num_steps,
        beta_schedule=args.ddpm_beta_schedule,
        prediction_type=args.prediction_type,
    )
    ema_model = None
    if args.use_ema:
        ema_model = EMAModel(
            model.parameters(),
            decay=args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            model_cls=UNet2DModel,
            model_config=model.config,
        )

    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    steps_per_epoch = randomness.steps_per_epoch(len(train_dataloader), accelerator.num_processes,
                                             args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_epochs * steps_per_epoch
    else:
        args.num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    # accelerate steps a prepared scheduler once per process per optimizer step.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )

    def save_model_hook(models, weights, output_dir):
        # Every rank gathers (ZeRO-3), the main process writes.
        for saved in models:
            unet = distributed.whole_model(accelerator, saved, device="cpu")
            if accelerator.is_main_process:
                unet.save_pretrained(os.path.join(output_dir, "unet"))
        if accelerator.is_main_process and ema_model is not None:
            ema_model.save_pretrained(os.path.join(output_dir, "unet_ema"))
        weights.clear()  # the unet/ folder replaces accelerate's own copy of the weights

    def load_model_hook(models, input_dir):
        # Under DeepSpeed `models` is empty: the engine restores its own (sharded) weights.
        if ema_model is not None:
            loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), UNet2DModel)
            ema_model.load_state_dict(loaded.state_dict())
            ema_model.to(accelerator.device)
        while models:
            target = accelerator.unwrap_model(models.pop())
            target.load_state_dict(UNet2DModel.from_pretrained(input_dir, subfolder="unet").state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    if ema_model is not None:
        ema_model.to(accelerator.device)

    global_step = checkpointing.resume_from_checkpoint(accelerator, args, run_state)

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            from huggingface_hub import create_repo

            repo_id = create_repo(
                args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
                exist_ok=True,
                private=args.hub_private_repo,
                token=args.hub_token,
            ).repo_id
        tracked = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(os.path.splitext(os.path.basename(__file__))[0], config=tracked)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"{len(train_dataset)} images, {args.num_epochs} epochs of {steps_per_epoch} steps, {args.max_train_steps} "
        f"steps in all, batch {args.train_batch_size} per device, total batch {total_batch_size}"
    )

    first_epoch, batches_to_skip = randomness.resume_position(global_step, steps_per_epoch,
                                                          args.gradient_accumulation_steps)
    if global_step >= args.max_train_steps:
        logger.info(f"Checkpoint step {global_step} >= --max_train_steps {args.max_train_steps}: nothing to train")
    progress_bar = tqdm(
        total=args.max_train_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    running_loss = torch.zeros((), device=accelerator.device)
    running_batches = 0
    checkpointer = checkpointing.Checkpointer(
        accelerator, args.output_dir, args.checkpointing_steps, args.checkpoints_total_limit, preemption
    )
    last_epoch = args.num_epochs - 1

    for epoch in range(first_epoch, args.num_epochs):
        if global_step >= args.max_train_steps:
            break
        model.train()
        loader, start = train_dataloader, 0
        if epoch == first_epoch and batches_to_skip:
            loader, start = accelerator.skip_first_batches(train_dataloader, batches_to_skip), batches_to_skip
        randomness.set_epoch(loader, epoch_sampler, epoch)
        for batch_index, batch in enumerate(loader, start=start):
            clean_images = batch["input"]
            generator = randomness.make_generator(
                accelerator.device, run_state.seed, NOISE_STREAM, epoch, batch_index, accelerator.process_index
            )
            noise = objectives.sample_noise(clean_images, generator)
            timesteps = objectives.sample_timesteps(
                clean_images.shape[0], noise_scheduler.config.num_train_timesteps, generator, clean_images.device
            )
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)

            with accelerator.accumulate(model):
                model_output = model(noisy_images, timesteps).sample
                target = objectives.loss_target(noise_scheduler, args.prediction_type, clean_images, noise, timesteps)
                # Upstream weights the sample-prediction loss by the SNR so that it matches epsilon's scale.
                weights = compute_snr(noise_scheduler, timesteps) if args.prediction_type == "sample" else None
                loss = objectives.diffusion_loss(model_output, target, weights)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            running_loss += loss.detach()
            running_batches += 1

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if ema_model is not None:
                ema_model.step(model.parameters())
            progress_bar.update(1)

            if global_step % args.logging_steps == 0:
                mean_loss = accelerator.reduce(running_loss, reduction="mean").item() / running_batches
                logs = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0], "epoch": epoch}
                if ema_model is not None:
                    logs["ema_decay"] = ema_model.cur_decay_value
                progress_bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['lr']:.2e}")
                accelerator.log(logs, step=global_step)
                running_loss.zero_()
                running_batches = 0

            checkpointer.save_if_due(global_step)

            stop_status = checkpointer.stop_if_requested(global_step)
            if stop_status:
                progress_bar.close()
                accelerator.end_training()
                return stop_status
            if global_step >= args.max_train_steps:
                break

        # Upstream cadence: samples and model every N epochs and after the last one.
        is_last_epoch = epoch == last_epoch or global_step >= args.max_train_steps
        if epoch % args.save_images_epochs == 0 or is_last_epoch:
            unet = distributed.whole_model(accelerator, model)
            if ema_model is not None:
                ema_model.store(unet.parameters())
                ema_model.copy_to(unet.parameters())
            sample_images = generate_sample_grid(accelerator, unet, noise_scheduler, args)
            if ema_model is not None:
                ema_model.restore(unet.parameters())
            if accelerator.is_main_process:
                path = save_sample_grid(accelerator, sample_images, epoch, global_step, args)
                logger.info(f"Saved samples to {path}")
        if epoch % args.save_model_epochs == 0 and not is_last_epoch:
            unet = distributed.whole_model(accelerator, model, device="cpu")
            if accelerator.is_main_process:
                save_pipeline(unet, ema_model, noise_scheduler, args, global_step)
        accelerator.wait_for_everyone()
    progress_bar.close()

    final_unet = distributed.whole_model(accelerator, model, device="cpu")
    if accelerator.is_main_process:
        save_pipeline(final_unet, ema_model, noise_scheduler, args, global_step)
        logger.info(f"Saved the DDPMPipeline to {args.output_dir}")
        if args.push_to_hub:
            from huggingface_hub import upload_folder

            upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                commit_message=f"Step {global_step}",
                ignore_patterns=["step_*", "epoch_*", "checkpoint-*", f"{checkpointing.PARTIAL_PREFIX}*"],
                token=args.hub_token,
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    cli.run_main(main)
