"""Finding GPT-2 checkpoints (hub cache, hub download, local folder) and reading them into GPT-2's bare names."""
import json
import os
import re
from pathlib import Path

import torch
from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors import safe_open

HUB_REPOS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # a hub repository: owner/name


def read_checkpoint(name_or_path, cache_dir=None):
    """-> (config dict, {bare name: tensor as stored}, a description of where it came from)."""
    folder, repo = _locate(name_or_path)
    if folder is not None:
        return _read_folder(folder)
    config_file, weights_file = (_hub_file(repo, f, cache_dir) for f in ("config.json", "model.safetensors"))
    return json.loads(Path(config_file).read_text()), _read_safetensors([weights_file]), f"{repo} ({weights_file})"


def read_config(name_or_path, cache_dir=None):
    """-> the config.json dict of a hub name or local folder, without reading the weights (same errors as
    read_checkpoint)."""
    folder, repo = _locate(name_or_path)
    if folder is not None:
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has no config.json")
        return json.loads((folder / "config.json").read_text())
    return json.loads(Path(_hub_file(repo, "config.json", cache_dir)).read_text())


def _locate(name_or_path):  # -> (a local folder, None) or (None, a hub repository)
    folder = Path(os.path.expanduser(str(name_or_path)))
    if folder.is_dir():
        return folder, None
    name = str(name_or_path)
    repo = HUB_REPOS.get(name) or (name if name in HUB_REPOS.values() else None)
    if repo is None and REPO_ID.fullmatch(name) and not folder.parent.is_dir():  # owner/name, no local folder
        repo = name
    if repo is None:
        if os.sep in name or name.startswith((".", "~")):
            raise FileNotFoundError(f"no folder at {name}: pass a folder holding config.json and model.safetensors")
        raise ValueError(f"unknown model name {name!r}: the known names are {', '.join(HUB_REPOS)}; or give a hub "
                         f"repository (owner/name) or a local folder holding config.json and model.safetensors")
    return None, repo


def model_files(name_or_path, names, cache_dir=None, download=True):
    """-> ({file name: path} of those of `names` the model has, where they are, its hub repository or None for a
    folder). A folder: the files in it. A hub repository: each file from the hub cache, else (download) from the hub
    until it proves unreachable (then those not cached are left out)."""
    folder, repo = _locate(name_or_path)
    if folder is not None:
        return {n: str(folder / n) for n in names if (folder / n).is_file()}, str(folder), None
    found, online = {}, True
    for name in names:
        cached = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        if isinstance(cached, str):
            found[name] = cached
        elif cached is None and online and download:  # not known in the cache either way: ask the hub
            try:
                found[name] = hf_hub_download(repo, name, cache_dir=cache_dir)
            except LocalEntryNotFoundError:  # no network, or HF_HUB_OFFLINE: stop asking
                online = False
            except EntryNotFoundError:  # the repository has no such file
                pass
    return found, repo, repo


def _hub_file(repo, filename, cache_dir):
    try:  # the cache first: this works offline
        return hf_hub_download(repo, filename, cache_dir=cache_dir, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    try:
        return hf_hub_download(repo, filename, cache_dir=cache_dir)
    except Exception as e:  # offline mode, no network, hub down: all end the same way for the user
        if isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError):  # the hub answered
            raise FileNotFoundError(f"{repo} has no {filename} on the hub: minprefix reads config.json and "
                                    f"model.safetensors (GPT-2's layout)") from e
        cache = cache_dir or constants.HF_HUB_CACHE
        raise OSError(
            f"cannot load {repo}: the Hugging Face hub is unreachable from here ({type(e).__name__}) and "
            f"{filename} is not in the local hub cache at {cache}. Either run once on a machine with internet "
            f"(the files land in that cache; HF_HUB_CACHE moves it), or point at a local folder holding "
            f"config.json and model.safetensors: export MINPREFIX_MODEL=/path/to/gpt2, or write that line in the "
            f"checkout's .env (see .env.example), or pass --model. On this "
            f"project's offline machines the folder is ../shared/models/imdb-gpt2-19m (a small stand-in, NOT "
            f"GPT-2).") from e


def _read_folder(folder):
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif (folder / "model.safetensors.index.json").is_file():  # sharded: {"weight_map": {tensor: shard file}}
        weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        files = [folder / f for f in sorted(set(weight_map.values()))]
    else:
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
    return json.loads(config_file.read_text()), _read_safetensors(files), str(folder)


def _read_safetensors(files):
    """Both layouts found in the wild -> bare GPT2Model names: the hub's file (`h.0.attn.c_attn.weight`) and
    save_pretrained's (`transformer.h.0.attn.c_attn.weight`, maybe with `lm_head.weight`)."""
    tensors, lm_head = {}, None
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            keys = list(st.keys())
        for key in keys:
            name = key.removeprefix("transformer.")
            if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
                continue
            # One short-lived mapping of the file per tensor, copied out: the model owns its weights once, and no
            # page of the file stays mapped beside them (a relayout such as wte's would otherwise hold both).
            with safe_open(str(f), framework="pt") as st:
                t = st.get_tensor(key).clone()
            if name == "lm_head.weight":
                lm_head = t
            else:
                tensors[name] = t
    if lm_head is not None and "wte.weight" in tensors and not torch.equal(lm_head, tensors["wte.weight"]):
        raise ValueError(f"{files[0]}: lm_head.weight differs from wte.weight; GPT-2 ties them and so does this model")
    return tensors
