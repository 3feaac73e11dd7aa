"""The family layer's contract (SPEC §12): a script names a model family only in its per-family defaults
(`FAMILY_DEFAULTS`, the task x family matrix README shows), everything that differs between families goes through the
family object, and a family without a row is refused in one line."""

import ast
import os
import re

import pytest
import torch

from trainkit import cli, families

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train_unconditional.py", "train_text_to_image.py", "train_dreambooth_lora.py", "train_controlnet.py",
           "train_instruct_pix2pix.py", "textual_inversion.py")
# An identifier that names a family (`args.sdxl`, `is_flux_model`, `model_kind`, `load_sdxl_text_models`, ...).
FAMILY_IDENTIFIER = re.compile(r"sdxl|flux|qwen|model_kind|(^|_)xl($|_)|(^|_)sd($|_)", re.IGNORECASE)
# A string that names a family or one of its classes ("sdxl", "StableDiffusionXLPipeline", "FLUX.1", ...).
FAMILY_STRING = re.compile(r"^(sd|sdxl|flux)$|SDXL|StableDiffusionXL|\bFlux|FLUX|\bXL\b|-xl\b|_xl\b|[Qq]wen")


def script_tree(script, root=ROOT):
    with open(os.path.join(root, script)) as file:
        return ast.parse(file.read(), filename=script)


def family_defaults_node(tree):
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "FAMILY_DEFAULTS" for t in node.targets):
            return node
    return None


def exempt_strings(tree):
    """Docstrings and argparse help texts may describe the families (what a flag defaults to on SDXL)."""
    exempt = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                exempt.add(id(first.value))
        if isinstance(node, ast.keyword) and node.arg in ("help", "description"):
            exempt.update(id(sub) for sub in ast.walk(node.value))
    return exempt


def family_mentions(script, root=ROOT):
    """Where `script` names a family outside its FAMILY_DEFAULTS: (line, what) pairs."""
    tree = script_tree(script, root)
    defaults = family_defaults_node(tree)
    skipped = {id(sub) for sub in ast.walk(defaults)} if defaults is not None else set()
    exempt = exempt_strings(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names = []
        if isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names = [node.name]
        elif isinstance(node, ast.arg):
            names = [node.arg]
        elif isinstance(node, ast.keyword) and node.arg:
            names = [node.arg]
        elif isinstance(node, ast.alias):
            names = [node.asname or node.name]
        found += [(node.lineno, name) for name in names if FAMILY_IDENTIFIER.search(name)]
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in exempt:
            if FAMILY_STRING.search(node.value):
                found.append((node.lineno, repr(node.value[:60])))
        # Asking which family is loaded: `family.name == ...`, `family is ...`, isinstance(x, SomeFamily).
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                if isinstance(side, ast.Attribute) and side.attr in ("name", "title", "described") and \
                        "family" in ast.unparse(side.value):
                    found.append((node.lineno, ast.unparse(node)))
    return sorted(set(found))


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_names_families_only_in_its_defaults(script):
    mentions = family_mentions(script)
    assert not mentions, f"{script} names a model family outside FAMILY_DEFAULTS: " + "; ".join(
        f"line {line}: {what}" for line, what in mentions[:20])


def test_the_defaults_rows_are_the_readme_matrix():
    """Each script's FAMILY_DEFAULTS rows name known families, and README's task x family table says "ready" in
    exactly those cells."""
    with open(os.path.join(ROOT, "README.md")) as file:
        readme = file.read()
    header = next(line for line in readme.splitlines() if line.startswith("| script | trains |"))
    titles = [cell.strip() for cell in header.strip("|").split("|")][2:]
    title_to_name = {family.title: name for name, family in families.FAMILIES.items()}
    title_to_name["SD 1.x/2.x"] = "sd"
    for script in SCRIPTS:
        node = family_defaults_node(script_tree(script))
        rows = set(ast.literal_eval(node.value)) if node is not None else set()
        assert rows <= set(families.FAMILIES), script
        line = next(line for line in readme.splitlines() if line.startswith(f"| `{script}` |"))
        cells = [cell.strip() for cell in line.strip("|").split("|")][2:]
        ready = {title_to_name[title] for title, cell in zip(titles, cells) if cell.startswith("ready")}
        assert ready == rows, f"README's row for {script} says {sorted(ready)}, its FAMILY_DEFAULTS {sorted(rows)}"


def test_a_family_without_a_row_is_refused_in_one_line_and_a_row_fills_the_flags_left_out(tmp_path):
    from argparse import Namespace

    from helpers import write_json

    flux = tmp_path / "flux"
    (flux / "transformer").mkdir(parents=True)
    write_json(str(flux / "model_index.json"), {"_class_name": "FluxPipeline"})
    args = Namespace(pretrained_model_name_or_path=str(flux), revision=None, resolution=None, seed=3)
    with pytest.raises(cli.InputError) as error:
        families.select(args, {"sd": {}, "sdxl": {}}, "train_controlnet.py")
    message = str(error.value)
    assert "\n" not in message
    assert "is a FLUX.1 model, which train_controlnet.py does not train (it trains Stable Diffusion, SDXL" in message
    family = families.select(args, {"flux": {"resolution": 512, "seed": 0}}, "train_dreambooth_lora.py")
    assert family is families.FAMILIES["flux"]
    assert (args.resolution, args.seed) == (512, 3)  # a flag given keeps its value


def test_families_are_detected_from_the_pipeline_class_or_their_parts(tiny_sdxl, tmp_path):
    from helpers import write_json

    assert families.detect(tiny_sdxl).name == "sdxl"
    sd = tmp_path / "sd"
    (sd / "unet").mkdir(parents=True)
    write_json(str(sd / "model_index.json"), {"_class_name": "StableDiffusionPipeline", "text_encoder": []})
    write_json(str(sd / "unet" / "config.json"), {"_class_name": "UNet2DConditionModel"})
    assert families.detect(str(sd)).name == "sd"
    # No model_index.json: a text_encoder_2/ or a text_time UNet is enough for SDXL.
    (sd / "model_index.json").unlink()
    assert families.detect(str(sd)).name == "sd"
    write_json(str(sd / "unet" / "config.json"), {"addition_embed_type": "text_time"})
    assert families.detect(str(sd)).name == "sdxl"
    write_json(str(sd / "unet" / "config.json"), {})
    (sd / "text_encoder_2").mkdir()
    assert families.detect(str(sd)).name == "sdxl"
    # A path that does not exist is SD's (its folder check names it); broken JSON is one line.
    assert families.detect(str(tmp_path / "missing")).name == "sd"
    (sd / "model_index.json").write_text("{ not json")
    with pytest.raises(cli.InputError, match="cannot read model_index.json"):
        families.detect(str(sd))
    assert set(families.FAMILIES["sdxl"].parts) == {name for name in os.listdir(tiny_sdxl)
                                                    if name != "model_index.json"}

    flux = tmp_path / "flux"
    (flux / "transformer").mkdir(parents=True)
    write_json(str(flux / "model_index.json"), {"_class_name": "FluxPipeline"})
    assert families.detect(str(flux)).name == "flux"
    (flux / "model_index.json").unlink()
    assert families.detect(str(flux)).name == "sd"
    write_json(str(flux / "transformer" / "config.json"), {"_class_name": "FluxTransformer2DModel"})
    assert families.detect(str(flux)).name == "flux"


def test_the_layer_check_finds_a_family_branch(tmp_path):
    """The check above is not vacuous: a script with a family test outside its defaults fails it."""
    script = tmp_path / "train_example.py"
    script.write_text('FAMILY_DEFAULTS = {"sd": {}, "sdxl": {"resolution": 1024}}\n'
                      'def main(args):\n'
                      '    """Trains SD and SDXL."""\n'
                      '    if args.family.name == "sdxl":\n'
                      '        pass\n'
                      '    pipe = "StableDiffusionXLPipeline"\n'
                      '    return args.sdxl\n')
    lines = [line for line, _ in family_mentions("train_example.py", str(tmp_path))]
    assert lines == [4, 4, 6, 7]


# --------------------------------------------------------------------------------------------------------------------
# What the SD and SDXL families compute: the pipelines' own conditioning
# --------------------------------------------------------------------------------------------------------------------


def test_sd_prompt_encoding_is_the_pipelines(tmp_path):
    """SD: the last hidden state of its one encoder, no pooled embedding: StableDiffusionPipeline.encode_prompt's."""
    from diffusers import StableDiffusionPipeline
    from tiny_sd import build_tiny_sd

    tiny_sd = build_tiny_sd(str(tmp_path / "tiny_sd"))
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    family = families.FAMILIES["sd"]
    prompts = ["a photo of a cat", ""]
    input_ids = family.tokenize([pipeline.tokenizer], prompts)
    with torch.no_grad():
        prompt_embeds, pooled = family.encode_prompt([pipeline.text_encoder], input_ids)
        expected, _ = pipeline.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)
    assert pooled is None and torch.equal(prompt_embeds, expected)
    assert family.added_conditions(None, [(8, 8)], [(0, 0)], (8, 8)) is None


def test_sdxl_prompt_encoding_is_the_pipelines(tiny_sdxl):
    """Penultimate hidden states of both encoders side by side, pooled projection of the second: what
    StableDiffusionXLPipeline.encode_prompt returns for the same prompts, bit for bit."""
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    family = families.FAMILIES["sdxl"]
    prompts = ["a photo of a cat", ""]
    input_ids = family.tokenize([pipeline.tokenizer, pipeline.tokenizer_2], prompts)
    assert [ids.shape for ids in input_ids] == [(2, 77), (2, 77)]
    with torch.no_grad():
        prompt_embeds, pooled = family.encode_prompt([pipeline.text_encoder, pipeline.text_encoder_2], input_ids)
        expected, _, expected_pooled, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert prompt_embeds.shape == (2, 77, 32 + 24) and pooled.shape == (2, 16)
    assert torch.equal(prompt_embeds, expected) and torch.equal(pooled, expected_pooled)


def test_sdxl_time_ids_follow_each_samples_size_and_crop(tiny_sdxl):
    """One row per sample from that sample's own original size and crop (not constants), in the pipeline's order."""
    from diffusers import StableDiffusionXLPipeline

    from trainkit.families import sdxl

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    time_ids = sdxl.time_ids([(20, 24), (30, 17)], torch.tensor([[0, 3], [5, 0]]), (64, 64))
    assert time_ids.tolist() == [[20, 24, 0, 3, 64, 64], [30, 17, 5, 0, 64, 64]]
    assert time_ids.dtype == torch.float32
    expected = pipeline._get_add_time_ids((30, 17), (5, 0), (64, 64), torch.float32,
                                          text_encoder_projection_dim=pipeline.text_encoder_2.config.projection_dim)
    assert torch.equal(time_ids[1:], expected)
    # Per-sample targets (aspect-ratio buckets).
    assert sdxl.time_ids([(20, 24)], [(1, 2)], [(48, 64)]).tolist() == [[20, 24, 1, 2, 48, 64]]
    added = sdxl.FAMILY.added_conditions(torch.zeros(2, 16), [(20, 24), (30, 17)], [[0, 3], [5, 0]], (64, 64))
    assert set(added) == {"text_embeds", "time_ids"} and torch.equal(added["time_ids"], time_ids)
    # Upstream's crop flags win over each sample's real crop, coordinate by coordinate.
    assert sdxl.crops_for_time_ids(torch.tensor([[0, 3], [5, 0]]), top=7).tolist() == [[7, 3], [7, 0]]


def test_sdxl_vae_runs_in_fp32_unless_another_vae_is_given():
    from argparse import Namespace

    sd, sdxl = families.FAMILIES["sd"], families.FAMILIES["sdxl"]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        own, fixed = (Namespace(pretrained_vae_model_name_or_path=path) for path in (None, "madebyollin/fp16-fix"))
        assert sdxl.vae_dtype(own, dtype) == torch.float32
        assert sdxl.vae_dtype(fixed, dtype) == dtype
        assert sd.vae_dtype(own, dtype) == dtype
