"""Pretrained TransformerLens models from weights already on this machine; never a download.

:func:`load_pretrained` takes a Hugging Face model folder (``config.json`` plus weights, as
``save_pretrained`` writes it; a tokenizer in it is loaded too) or a model name whose files
are in the local Hugging Face cache, and returns

- with TransformerLens 3.x (``backend="hooked"``): a ``HookedTransformer``, processed as
  ``HookedTransformer.from_pretrained`` does by default (LayerNorm folded into the next weights,
  writing weights and unembedding centred) unless ``processing=False``;
- with 4.x (``backend="bridge"``): ``TransformerBridge.boot_transformers`` on the same folder or
  name (raw Hugging Face weights).

Every Hub access is switched off while loading (``huggingface_hub`` offline mode), so a
missing file is an error here and never a download.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from observables.models import backend as installed_backend
from suscept.errors import ConfigError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                    "tokenizer.model")


@contextlib.contextmanager
def offline():
    """Hugging Face Hub access off (``HF_HUB_OFFLINE``) inside the block, restored after."""
    import huggingface_hub.constants as hub

    before_env, before = os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before
        if before_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before_env


def load_pretrained(name_or_folder: str | Path, *, backend: str | None = None,
                    device: str = "cpu", dtype: torch.dtype = torch.float32,
                    processing: bool = True) -> nn.Module:
    """A pretrained model in eval mode, from a local folder or the local Hugging Face cache.

    Args:
        name_or_folder: a folder holding ``config.json`` and the weights, or a model name
            (``"gpt2"``, ``"EleutherAI/pythia-70m"``) already in the local cache.
        backend: ``"hooked"`` (3.x) or ``"bridge"`` (4.x); default: the installed line.
        device, dtype: where and in which precision the weights live.
        processing: 3.x only: ``from_pretrained``'s default weight processing (``fold_ln``,
            ``center_writing_weights``, ``center_unembed``); the model computes the same
            function either way, but its parameters (what SGLD samples) differ.
    Raises:
        ConfigError: the folder or cached files are missing or cannot be converted.
    """
    backend = backend or installed_backend()
    if backend != installed_backend():
        raise ConfigError(f"backend={backend!r} needs the other TransformerLens line; the "
                          f"installed one gives {installed_backend()!r}")
    source = str(name_or_folder)
    folder = Path(source).expanduser()
    is_folder = (folder / "config.json").exists()
    if not is_folder and (folder.exists() or source.startswith((".", "/", "~"))):
        raise ConfigError(f"{source} is not a Hugging Face model folder (no config.json); "
                          "write one with model.save_pretrained(folder)")
    if backend == "bridge" and is_folder and not _has_tokenizer(folder):
        raise ConfigError(f"{source} holds no tokenizer (tokenizer.json ...); TransformerLens 4.x "
                          "boot_transformers needs one: tokenizer.save_pretrained(folder)")
    with offline(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            if backend == "bridge":
                model = _bridge(source, device, dtype)
            elif is_folder:
                model = _hooked_folder(folder.resolve(), device, dtype, processing)
            else:
                model = _hooked_name(source, device, dtype, processing)
        except ConfigError:
            raise
        except Exception as e:  # what TransformerLens / transformers raise varies by version
            where = "folder" if is_folder else "local Hugging Face cache"
            raise ConfigError(f"could not load {source!r} offline from the {where} with "
                              f"TransformerLens ({backend}): {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300]}") from e
    return model.eval()


def _bridge(source: str, device: str, dtype: torch.dtype) -> nn.Module:
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_transformers(source, device=device, dtype=dtype)
    freeze_fused_qkv(model)
    return model


def freeze_fused_qkv(model: nn.Module) -> None:
    """4.x bridges of fused-QKV models (GPT-2's ``c_attn``, GPT-NeoX's ``query_key_value``)
    split the fused matrix into q, k, v projections that the forward uses, and keep the fused
    one as a parameter too (for GPT-2 the split ones are views of it). Giving q, k, v memory
    of their own and freezing the fused copy leaves each weight exactly once among the
    trainable parameters; the forward is unchanged (bitwise)."""
    for block in model.blocks:
        attn = getattr(block, "attn", None)
        if all(hasattr(attn, c) for c in ("qkv", "q", "k", "v")):
            for p in attn.qkv.parameters():
                p.requires_grad_(False)
            for c in "qkv":
                for p in getattr(attn, c).parameters():
                    p.data = p.data.clone()


def _hooked_name(name: str, device: str, dtype: torch.dtype, processing: bool) -> nn.Module:
    from transformer_lens import HookedTransformer

    return HookedTransformer.from_pretrained(
        name, device=device, dtype=dtype, fold_ln=processing,
        center_writing_weights=processing, center_unembed=processing)


def _hooked_folder(folder: Path, device: str, dtype: torch.dtype,
                   processing: bool) -> nn.Module:
    """``from_pretrained`` for a folder (3.x refuses any name outside its list of official
    names): the same config conversion, state-dict conversion and weight processing.

    TransformerLens picks some architectures from substrings of the name (``"llama"``,
    ``"gemma"``, ``"bert"``, ``"t5"``), so the config is read through a link with a neutral
    name and the Hugging Face model is loaded here and handed over.
    """
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="suscept_") as tmp:
        link = Path(tmp) / "model"
        link.symlink_to(folder, target_is_directory=True)
        if any(s in str(link).lower() for s in ("llama", "gemma")):
            raise ConfigError(f"the temporary folder {tmp} contains 'llama' or 'gemma', "
                              "which TransformerLens reads as an architecture; set TMPDIR")
        cfg = loading.get_pretrained_model_config(str(link), fold_ln=processing, device=device,
                                                  dtype=dtype)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    state_dict = loading.get_pretrained_state_dict(str(folder), cfg, hf_model, dtype=dtype)
    tokenizer = None
    if _has_tokenizer(folder):
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    cfg.tokenizer_name = str(folder) if tokenizer is not None else None
    fold_ln = center = processing
    if cfg.positional_embedding_type == "shortformer" or cfg.original_architecture in _post_norm():
        fold_ln = center = False  # as from_pretrained: these cannot be folded
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state_dict, fold_ln=fold_ln, center_writing_weights=center,
                                      center_unembed=center and not _softcap(cfg))
    return model.to(device)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).exists() for f in _TOKENIZER_FILES)


def _post_norm() -> set:
    from observables.adapter import _post_norm as names

    return names()


def _softcap(cfg) -> bool:
    cap = getattr(cfg, "output_logits_soft_cap", -1.0)
    return cap is not None and cap > 0
