"""Model families: which family a base model folder holds, and the one module that knows each (`sd`: Stable Diffusion
1.x/2.x, `sdxl`, `flux`: FLUX.1, `qwen_image`: Qwen-Image, `flux2`: FLUX.2 [dev], `flux2_klein`: FLUX.2 [klein],
`sd3`: SD3/3.5, `z_image`: Z-Image). A script asks `select` for the family of
--pretrained_model_name_or_path and calls it for everything that differs between families; the script names a family
only in its defaults rows (upstream's per-script defaults), which are the task x family matrix: a family without a row
is refused in one line."""

from trainkit.cli import InputError
from trainkit.families import flux, flux2, flux2_klein, qwen_image, sd, sd3, sdxl, z_image
from trainkit.families.loading import read_model_index

# Detection order: the most specific first; SD is what is left. One family a line.
FAMILIES = {family.name: family for family in (
    flux2.FAMILY,
    flux2_klein.FAMILY,
    flux.FAMILY,
    qwen_image.FAMILY,
    sd3.FAMILY,
    z_image.FAMILY,
    sdxl.FAMILY,
    sd.FAMILY,
)}


def detect(pretrained_model_name_or_path, revision=None, cache_dir=None):
    """The family of a base model (a local folder or a hub id)."""
    index = read_model_index(pretrained_model_name_or_path, revision, cache_dir)
    return next(family for family in FAMILIES.values() if family.recognises(pretrained_model_name_or_path, index))


def select(args, defaults, script):
    """The family of --pretrained_model_name_or_path, which `script` must have a row of `defaults` for ({family
    name: {flag: default}}); the row's values fill the flags left out (None). Raises InputError naming the model,
    its family and the scripts' families otherwise."""
    path = args.pretrained_model_name_or_path
    family = detect(path, args.revision, getattr(args, "cache_dir", None))
    if family.name not in defaults:
        trained = ", ".join(FAMILIES[name].title for name in defaults)
        raise InputError(f"--pretrained_model_name_or_path {path!r} is {family.described} model, which {script} does "
                         f"not train (it trains {trained}; see the task x family table in README.md)")
    for name, value in defaults[family.name].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return family

