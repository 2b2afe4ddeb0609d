"""``export --arch ARCH --features LAYER``: a layer of the torchvision network named as pytorch-grad-cam's users
name target layers (``model.features[-1]``, ``layer4[-1]``, ``encoder.layers[-1].ln_1``) or as
``named_modules()`` does (``features.16``, ``encoder.layers.encoder_layer_11.ln_1``)."""

from __future__ import annotations

import re

from torch import nn

from realtime_cam.errors import ExportError

_PART = re.compile(r"\[(-?\d+)\]|\.?([A-Za-z_]\w*|\d+)")
SUGGESTED = 8  # names listed when a name is unknown


def resolve_layer(model: nn.Module, spec: str, arch: str) -> tuple[nn.Module, str]:
    """(the module ``spec`` names in ``model``, its ``named_modules`` name).

    Raises:
        ExportError: in one line, listing some names that exist, when ``spec`` names no module.
    """
    text = spec.strip()
    text = text[len("model"):] if text.startswith(("model.", "model[")) else text
    module, pos = model, 0
    try:
        while pos < len(text):
            match = _PART.match(text, pos)
            if match is None or match.end() == pos:
                raise LookupError(text[pos:])
            index, name = match.group(1), match.group(2)
            if index is not None or name.isdigit():
                children = list(module.children())
                module = children[int(index if index is not None else name)]
            else:
                module = getattr(module, name)
            if not isinstance(module, nn.Module):
                raise LookupError(name)
            pos = match.end()
    except (LookupError, AttributeError, IndexError):
        module = None
    names = {id(m): n for n, m in model.named_modules()}
    if module is None or module is model or id(module) not in names:
        raise ExportError(f"--features {spec}: {arch} has no layer of that name; for example: "
                          f"{', '.join(examples(model))} (names as model.named_modules() gives them, or indexed as "
                          "pytorch-grad-cam's target layers are: layer[-1])")
    return module, names[id(module)]


def examples(model: nn.Module) -> list[str]:
    """A few layer names of ``model``: the last blocks (modules with parts) at most three levels deep."""
    blocks = [n for n, m in model.named_modules() if n and n.count(".") < 3 and any(True for _ in m.children())]
    return blocks[-SUGGESTED:]
