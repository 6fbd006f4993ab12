"""The kinds of value a saved record's field holds, each written to JSON (and arrays) and read back checked: plain
values (int, float, str, bool), optional ones, lists, tuples, maps as [key, value] pairs, and tensors or numpy
arrays of a given dtype and shape packed into one flat array per dtype. Used by sums/serial.py, which lists the
record types and the kind of each field; anything that is not of its kind is a `StateError` naming the place.
"""
from __future__ import annotations

import math

import numpy as np
import torch


class StateError(ValueError):
    """A saved state that is not what lm_ce writes: the message names the place (run.tally.positions.nll: ...)."""


def where(path) -> str:
    """A place as written in messages ('run.tally.positions.nll'), from the (parent, step) pairs kept while walking
    (built only when something is wrong)."""
    steps = []
    while isinstance(path, tuple):
        path, step = path
        steps.append(f".{step}" if isinstance(step, str) else f"[{step!r}]")
    return str(path) + "".join(reversed(steps))


class Kind:
    def encode(self, value, arrays, path):
        raise NotImplementedError

    def decode(self, data, arrays, path):
        raise NotImplementedError


class Scalar(Kind):
    """int (not bool), float (an int accepted), str or bool."""

    def __init__(self, *types: type):
        self.types, self.first = types, types[0]

    def encode(self, value, arrays, path):
        if type(value) is self.first:
            return value
        if isinstance(value, (np.generic, torch.Tensor)):  # a numpy or torch scalar that slipped into a sum
            value = value.item()
        return self.decode(value, arrays, path)  # what is written is what would be read

    def decode(self, data, arrays, path):
        if type(data) is self.first:
            return data
        if isinstance(data, bool) != (bool in self.types) or not isinstance(data, self.types):
            raise StateError(f"{where(path)}: expected {'/'.join(t.__name__ for t in self.types)}, found "
                             f"{type(data).__name__}")
        return float(data) if self.first is float else self.first(data)


INT, FLOAT, STR, BOOL = Scalar(int), Scalar(float, int), Scalar(str), Scalar(bool)


class Opt(Kind):
    def __init__(self, kind: Kind):
        self.kind = kind

    def encode(self, value, arrays, path):
        return None if value is None else self.kind.encode(value, arrays, path)

    def decode(self, data, arrays, path):
        return None if data is None else self.kind.decode(data, arrays, path)


class List(Kind):
    def __init__(self, kind: Kind, tuple_of: tuple[Kind, ...] | None = None):
        self.kind, self.tuple_of = kind, tuple_of

    def _kinds(self, n: int, path) -> list[Kind]:
        if self.tuple_of is None:
            return [self.kind] * n
        if n != len(self.tuple_of):
            raise StateError(f"{where(path)}: expected {len(self.tuple_of)} items, found {n}")
        return list(self.tuple_of)

    def encode(self, value, arrays, path):
        if isinstance(self.kind, Scalar) and self.tuple_of is None:  # plain values: written as they are
            plain = self.kind.first
            if all(type(v) is plain for v in value):
                return list(value)
            return [self.kind.encode(v, arrays, (path, i)) for i, v in enumerate(value)]
        return [k.encode(v, arrays, (path, i)) for i, (k, v) in enumerate(zip(self._kinds(len(value), path), value))]

    def decode(self, data, arrays, path):
        if not isinstance(data, list):
            raise StateError(f"{where(path)}: expected a list, found {type(data).__name__}")
        out = [k.decode(v, arrays, (path, i)) for i, (k, v) in enumerate(zip(self._kinds(len(data), path), data))]
        return tuple(out) if self.tuple_of is not None else out


def Tuple(*kinds: Kind) -> List:
    return List(kinds[0], tuple_of=kinds)


class Map(Kind):
    """A dict, written as a list of [key, value] pairs (keys keep their type: int, str or None)."""

    def __init__(self, key: Kind, value: Kind):
        self.key, self.value = key, value

    def encode(self, value, arrays, path):
        return [[self.key.encode(k, arrays, path), self.value.encode(v, arrays, (path, k))] for k, v in value.items()]

    def decode(self, data, arrays, path):
        if not isinstance(data, list) or not all(isinstance(p, list) and len(p) == 2 for p in data):
            raise StateError(f"{where(path)}: expected a list of [key, value] pairs")
        out = {}
        for k, v in data:
            key = self.key.decode(k, arrays, (path, "key"))
            if key in out:
                raise StateError(f"{where(path)}: the key {key!r} is given twice")
            out[key] = self.value.decode(v, arrays, (path, key))
        return out


FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NUMBERS = (*FLOATS, torch.int64, torch.int32, torch.bool)
DTYPES = {str(d).replace("torch.", ""): d for d in (*NUMBERS, torch.uint8)}  # the packed arrays' names


class Packed:
    """Tensors being encoded: one list of flat tensors per dtype, and how many values each holds so far."""

    def __init__(self):
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.sizes: dict[str, int] = {}

    def add(self, tensor: torch.Tensor) -> tuple[str, int]:
        name = str(tensor.dtype).replace("torch.", "")
        at = self.sizes.get(name, 0)
        self.parts.setdefault(name, []).append(tensor.reshape(-1))
        self.sizes[name] = at + tensor.numel()
        return name, at

    def arrays(self) -> dict[str, torch.Tensor]:
        return {name: torch.cat(parts) for name, parts in self.parts.items()}


class Tensor(Kind):
    """A torch tensor (or with `numpy`, a numpy array) of one of `dtypes`, with `shape` (None: any length), stored
    as a slice of its dtype's packed array."""

    def __init__(self, dtypes, shape: tuple, numpy: bool = False):
        self.dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
        self.shape, self.numpy, self.tag = shape, numpy, "array" if numpy else "tensor"
        self.fixed = [(i, n) for i, n in enumerate(shape) if n is not None]  # dimensions of a given size

    def encode(self, value, packed: Packed, path):
        tensor = torch.from_numpy(np.ascontiguousarray(value)) if self.numpy else value.detach().cpu()
        self._check(tensor, path)
        name, at = packed.add(tensor)
        return {self.tag: name, "at": at, "shape": list(tensor.shape)}

    def decode(self, data, arrays, path):
        if not isinstance(data, dict) or set(data) != {self.tag, "at", "shape"} or data[self.tag] not in DTYPES:
            raise StateError(f"{where(path)}: expected a reference to a saved {self.tag}")
        at, shape, flat = data["at"], data["shape"], arrays.get(data[self.tag])
        counts = [type(n) is int and n >= 0 for n in (at, *shape)] if isinstance(shape, list) else [False]
        if flat is None or not all(counts) or len(shape) > 4 or at + math.prod(shape) > len(flat):
            raise StateError(f"{where(path)}: a {self.tag} outside the saved arrays")
        tensor = flat[at : at + math.prod(shape)].view(shape)
        self._check(tensor, path)
        return tensor.numpy() if self.numpy else tensor

    def _check(self, tensor, path):
        if tensor.dtype not in self.dtypes:
            raise StateError(f"{where(path)}: expected {'/'.join(str(d) for d in self.dtypes)}, found {tensor.dtype}")
        shape = tensor.shape
        if len(shape) != len(self.shape) or (self.fixed and any(shape[i] != n for i, n in self.fixed)):
            want = "x".join("n" if s is None else str(s) for s in self.shape)
            raise StateError(f"{where(path)}: expected shape [{want}], found {list(tensor.shape)}")
