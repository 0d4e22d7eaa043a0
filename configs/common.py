"""Every knob of dim_jax with its default; the recipes in this folder start from `base_config()`.

The returned config is locked: a recipe or a `--config.x.y=...` override may change any field
below but cannot add one, so a misspelt key fails at once with the list of valid fields.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Backbone. `variant` sets width, depth and patch size (DiM: "S/2", "L/2", "H/2"; DiT: "S/2",
  # "B/2", "L/2", "XL/2"); "" uses the explicit width / depth / patch_size below.
  c.model = dict(
    name="dim",  # dim | dit (the Transformer baseline)
    variant="",
    width=512,
    depth=25,
    patch_size=2,
    in_channels=3,
    input_size=32,  # image (or latent) side the position table is stored at
    num_classes=10,  # label `num_classes` is the null class (unconditional / CFG)
    d_state=16,
    d_conv=3,
    expand=2,
    pad_layout="lateral",  # "lateral" (256² recipes) or "rho_pad" (512² fine-tune, upsampling)
    scan_directions=4,  # 4 (DiM), 2 (row and reverse row) or 1 (raster only; ablation)
    # The selective scan (dim_jax.ops.ScanConfig; docs/scan.md has the design and the figures).
    scan=dict(
      # auto (the fastest correct one per platform: reference on CPU, pallas_gpu on GPU,
      # pallas_tpu on TPU, chunked elsewhere) | reference (sequential lax.scan) | associative
      # (lax.associative_scan, keeps (B, L, D, N) for the backward) | chunked (lax.scan over
      # rematerialised chunks) | pallas_gpu (the fused Pallas kernel for GPUs) | pallas_tpu (the
      # fused Mosaic kernel for TPUs); off their platform both run in the Pallas interpreter, slowly
      impl="auto",
      # Time steps per chunk; 0 = the impl's own (chunked: 256; pallas_gpu: 4, unrolled, so longer
      # chunks cost registers and minutes of compile; pallas_tpu: 128, a multiple of 8, staged
      # through VMEM). pallas_gpu keeps one float32 (N, D) state per chunk x save_every steps and
      # sample for its backward: 0.45 GB per layer call at 1536² (L = 9216, D = 3072) with the
      # defaults; pallas_tpu one per chunk (0.015 GB there).
      chunk=0,
      # pallas_gpu: chunks per kept state; m > 1 keeps m x less memory for one more pass of exps
      # in the backward (chunk=2, save_every=4, fwd_chunk=4: 0.23 GB at 1536²).
      save_every=1,
      # pallas_gpu: the forward's own chunk, a divisor of chunk x save_every; 0 = chunk.
      fwd_chunk=0,
      # pallas_gpu: programs the sequence is split over (each more program costs a second pass of
      # exps); 0 = 32 when batch x D / 32 < 528 programs and L >= 4096, else 1.
      segments=0,
    ),
    # What each block keeps for the backward pass (memory for compute): none (everything) |
    # block (only its input: recompute the block) | save_dots (matmul outputs; recompute the rest)
    # | save_scan (DiM: the Mamba mixer's in_proj and out_proj outputs, the scan's output and the
    # fused scan's chunk states; recompute the norm, conv and small projections, not the scan)
    remat="none",
    # DiM: False: blocks one by one | True: the parameters of every 4 consecutive encoder
    # (decoder) blocks stacked and the groups run as one compiled nnx.scan body, from 2 groups per
    # side on (DiM-H compiles 9 blocks, not 49). Stacked compiles faster but steps slower and plans
    # more memory (benchmarks/train_step.py --stack 1,0), so a long run is faster unstacked. The
    # same model and weights; either layout's checkpoints load in both.
    stack_blocks=False,
    dtype="float32",  # compute dtype: float32 | bfloat16 (parameters and scan state stay fp32)
    num_heads=8,  # DiT only, when variant is ""
    attention_impl="auto",  # DiT only: auto (cuDNN on GPU in bf16/fp16) | cudnn | xla
  )

  # Input pipeline (dim_jax/data; its docstring describes every source). Fields a source does
  # not use are ignored by it.
  c.data = dict(
    name="shapes",  # shapes | fashion_mnist | cifar10 | imagenet2012 | image_folder | latents
    image_size=32,  # square side after the ADM centre crop (or padding, for Fashion-MNIST)
    data_dir="",  # where the data lie ("" = the source's default); required for latents
    split="train",
    num_examples=50_000,  # size of the procedural "shapes" set
    shape_colours="random",  # shapes: random | by_class (one colour per class, dark background)
    rotate_shapes=True,  # shapes: random rotation (False: axis-aligned, triangles up)
    random_flip=True,
    download=False,  # cifar10 / imagenet2012: prepare the TFDS set if missing (needs TensorFlow)
    manual_dir="",  # imagenet2012 with download: folder of ILSVRC2012_img_*.tar
    latent_scale=0.18215,  # latents: Stable Diffusion's KL-f8 scale factor
    worker_count=0,  # grain worker processes (0 = in the main process); keep fixed across resumes
    read_threads=8,  # read-ahead threads per process, for sources that read files
  )

  # Diffusion formulation (dim_jax/diffusion).
  c.diffusion = dict(
    schedule="discrete",  # discrete (DDPM, SD scaled-linear betas) | vpsde (continuous)
    num_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_min=0.1,
    beta_max=20.0,
    p_uncond=0.1,  # label dropout to the null class, for classifier-free guidance
  )

  # AdamW with linear warm-up, then a constant rate (the official "customized" schedule) or a
  # cosine decay (short runs end on settled weights).
  c.optim = dict(
    learning_rate=2e-4,
    b1=0.99,
    b2=0.99,
    eps=1e-15,  # the official code's value
    weight_decay=0.03,
    # Which parameters decay: "all" (the official code: A_log, D, tables and biases included)
    # or "matrices" (only weights of rank >= 2, i.e. not biases, norms, A_log, D).
    weight_decay_on="all",
    warmup_steps=5000,
    decay="constant",  # after the warm-up: constant (official) | cosine (to 0 at train.num_steps)
    grad_clip_norm=1.0,  # 0 disables clipping
    # EMA of the weights: the long-run decay, reached after ~9 / (1 - d) steps; before that the
    # decay is min(d, (1 + t) / (10 + t)) at step t, so a short run's EMA already shows the model.
    ema_decay=0.9999,
  )

  c.train = dict(
    batch_size=768,  # global batch, over all devices and hosts
    grad_accum_steps=1,  # micro-batches per step (batch_size must divide by it)
    num_steps=750_000,
    log_every=100,  # steps between progress lines and scalar metrics
    checkpoint_every=5000,
    keep_checkpoints=3,  # most recent checkpoints kept (>= 1)
    keep_every=0,  # also keep every checkpoint whose step is a multiple of this (0: none)
    # Resume from this step's checkpoint instead of the newest one that restores (-1: newest).
    restore_step=-1,
    sample_every=0,  # steps between sample grids during training (0: only at the end)
    # "first:last", e.g. "100:105": record a jax.profiler trace of these steps into
    # <workdir>/plugins/profile (TensorBoard's Profile tab); "" records none.
    profile_steps="",
    # Stage transition: start a new run from another workdir's latest checkpoint (its weights;
    # the position table resized to this grid, EMA reset to the weights, a fresh optimizer).
    init_from="",
  )

  # Sampling (the end-of-training grid, and --mode=sample).
  c.sample = dict(
    sampler="dpm_solver_fast",  # ddpm | ddim | dpm_solver_fast | dpm_solver_pp_2m | euler_maruyama
    steps=50,
    eta=0.0,  # DDIM stochasticity (ddim only; 0 = deterministic)
    guidance_scale=1.4,  # w in ε_u + w(ε_c - ε_u); 1 disables guidance (official s = w - 1)
    num_images=64,  # images in the end-of-training grid and --mode=sample (0: no grid)
    batch_size=64,
    use_ema=True,
    # Upsample guidance (Hwang et al. 2024; DiM §3.4, dim_jax/diffusion/upsample.py): sample at
    # `scale` x model.input_size with no training; the position table is resized on the fly, the
    # padding tokens fill any grid. Both resolutions use classifier-free guidance_scale.
    upsample=dict(
      scale=1,  # m: 2 for 512² -> 1024², 3 for -> 1536²; 1 = off
      weight=1.0,  # η, the guidance weight (official 1); 0 = plain sampling at the larger size
      active_fraction=0.3,  # θ: guided while t >= 1 - θ, the first 30 % of the reverse path
      tau_grid=0,  # the low-res time τ: nearest SNR to m² SNR(t) among n/K, n = 1..K, and t;
      # K = this, 0 = diffusion.num_timesteps (official: the 1000 training steps)
    ),
  )

  # The Stable Diffusion KL-f8 VAE (latent recipes): a local diffusers
  # `diffusion_pytorch_model.safetensors` or original `autoencoder_kl_ema.pth`. Set, samples are
  # decoded with it; --mode=extract_latents encodes with it.
  c.vae = dict(path="", dtype="bfloat16")

  # --mode=extract_latents: VAE posterior moments of the image set in `data` -> `out_dir`.
  c.extract = dict(out_dir="", batch_size=64, dtype="float32")

  # Sample quality (dim_jax/evaluators.py): during training every `every` steps, and by
  # --mode=evaluate. FID, sFID, IS, precision and recall with Inception weights and reference
  # statistics; without them FD-FMNIST on fashion_mnist and FD-shapes on shapes (a classifier of
  # the data set, trained once into cache_dir), and only a sample grid on other data.
  c.eval = dict(
    every=0,  # steps between evaluations during training (0: none)
    num_samples=50_000,  # samples per evaluation, drawn with the EMA weights
    inception_path="",  # .npz made by `python -m dim_jax.tools.convert_inception`
    ref_stats="",  # ADM / U-ViT reference .npz, or one written by --mode=ref_stats
    batch_size=250,  # Inception batch for reference statistics
    cache_dir="",  # where data-set classifiers are kept ("" = ~/.cache/dim_jax)
  )

  # Device mesh: sizes of the ("data", "fsdp") axes; -1 takes the remaining devices. Inputs and
  # activations are split by their batch dimension over both axes.
  c.mesh = dict(
    data=-1,
    fsdp=1,
    # The mesh axes each logical axis of the parameters (and their optimizer state) is split over
    # (MaxText's logical_axis_rules), for each name the models use; None: whole on every device.
    # "embed": the model width (over "fsdp": FSDP); "mlp": Mamba's inner and the MLP width;
    # "heads": attention heads; "vocab": the class tables; "layers": the stacked block axis of
    # model.stack_blocks.
    rules=(("embed", "fsdp"), ("mlp", None), ("heads", None), ("vocab", None), ("layers", None)),
  )

  c.lock()
  return c


def apply_arg(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """`--config=file.py:smoke` shrinks any recipe to a CPU smoke run of about a minute.

  The model keeps its structure (same fields, layouts, schedule) at a tiny width and depth, and
  the data become the procedural shapes at the model's input size, so no data set is needed.
  """
  if not arg:
    return c
  if arg != "smoke":
    raise ValueError(f"config argument {arg!r}: the only one is 'smoke'.")
  c.model.update(variant="", width=32, depth=5, patch_size=2, in_channels=3, num_classes=4)
  c.model.update(d_state=4, dtype="float32", remat="none")
  c.model.scan.update(impl="auto")
  c.data.update(name="shapes", image_size=c.model.input_size, worker_count=0)
  c.train.update(batch_size=8, num_steps=10, log_every=5, checkpoint_every=5)
  c.sample.update(steps=min(c.sample.steps, 4), num_images=4, batch_size=4)
  c.eval.update(every=0)
  c.mesh.update(data=-1, fsdp=1)
  return c
