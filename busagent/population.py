"""Populations with backgrounds: the paper's "automatic background generation pipeline".

A config (JSON or YAML) describes the people; every attribute has a distribution:

    count: 1000
    seed: 7
    attributes:
      age_group: {type: categorical, values: {"18-29": 0.3, "30-49": 0.4, "50+": 0.3}}
      age: {type: integer, low: 18, high: 80}
      education: {type: categorical, values: [primary, secondary, bachelor, master, phd]}
      occupation:
        type: conditional
        on: age_group
        cases:
          "18-29": {type: categorical, values: {student: 0.5, clerk: 0.3, engineer: 0.2}}
        default: {type: categorical, values: {teacher: 1, engineer: 1, farmer: 1}}
      income: {type: normal, mean: 45000, std: 15000, min: 0, max: 200000, digits: 0}
      risk: {type: uniform, low: 0, high: 1, digits: 2}
    template: "A {age}-year-old {occupation} with a {education} education."
    prompt: "Write a three-sentence background for this person: {attributes}"

``build(config, out)`` samples each row's attributes (row ``i`` from its own generator seeded
with ``(seed, i)``: the same seed gives the same people whatever the count, and a resumed or
enlarged build continues the same sequence), then writes its background: from ``template``
alone, or, given a model config, written by an LLM **through the bus** (``BackgroundWriter``
agents on workers, rows sent to them in batches, each batch's rows run concurrently under the
model's per-worker cap, a failed row retried in a later batch). The output is JSON lines, one
person per line: ``{"id", "attributes", "background", "provenance": {"config_hash", "seed",
"model"}}``, appended as rows finish (not in id order). Re-running with the same config resumes:
the rows already in the file are kept and skipped, a half-written last line (a killed build) is
cut off, so no id is ever written twice.

Errors: ConfigError (bad config, a file written from another config), ModelError (rows that
still failed after their retries; re-running retries them), BusError from Redis.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import itertools
import json
import math
import random
import statistics
import string
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from .agent import Agent
from .errors import ConfigError, ModelError
from .message import Msg

#: rows sent to a writer agent in one message (each row is one model call)
BATCH = 32
#: times a row whose model call failed is sent again before the build gives up on it
ROW_RETRIES = 3
#: draws of a bounded normal before the bound nearest the last draw is taken: with at least
#: ``MIN_NORMAL_MASS`` inside the bounds, 64 misses in a row happen less than once in 10^5 rows
NORMAL_TRIES = 64
#: the least share of a normal's mass its [min, max] must keep (less is refused at load)
MIN_NORMAL_MASS = 0.2


#: a compiled distribution: (the row's generator, the attributes drawn so far) -> a value
Draw = Callable[[random.Random, dict[str, Any]], Any]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def compile(self) -> Draw:
        """The draw as a plain function (a million rows must not go through pydantic)."""
        raise NotImplementedError


class Categorical(_Spec):
    """One of ``values``: a list (equally likely) or ``{value: weight}`` (relative weights)."""

    type: Literal["categorical"]
    values: list[Any] | dict[str, float]

    @model_validator(mode="after")
    def _check(self) -> Categorical:
        weights = list(self.values.values()) if isinstance(self.values, dict) else []
        if not self.values:
            raise ValueError("categorical needs at least one value")
        if any(w < 0 for w in weights) or (weights and sum(weights) <= 0):
            raise ValueError("categorical weights must be >= 0 with a positive sum")
        return self

    def compile(self) -> Draw:
        # cumulative weights once, not per row (random.choices rebuilds them every call)
        items = list(self.values)
        if isinstance(self.values, dict):
            cum = list(itertools.accumulate(self.values.values()))
            top, find = cum[-1], bisect.bisect
            return lambda rng, row: items[find(cum, rng.random() * top)]
        n = len(items)
        return lambda rng, row: items[int(rng.random() * n)]


class Normal(_Spec):
    """A normal draw truncated to ``[min, max]``, rounded to ``digits`` (0: an int).

    Truncated, not clamped: a value outside the bounds is drawn again (at most
    ``NORMAL_TRIES`` times, then the bound nearest the draw), so the bounds do not pile rows up
    on themselves, as a user of a truncated normal expects. Bounds that keep less than
    ``MIN_NORMAL_MASS`` of the distribution (e.g. min > max, or both far in one tail) are
    refused at load: they would make nearly every row a bound."""

    type: Literal["normal"]
    mean: float
    std: float = Field(ge=0)
    min: float | None = None
    max: float | None = None
    digits: int | None = None

    @model_validator(mode="after")
    def _check(self) -> Normal:
        lo = -math.inf if self.min is None else self.min
        hi = math.inf if self.max is None else self.max
        if lo > hi:
            raise ValueError(f"normal min {self.min:g} is above max {self.max:g}")
        if self.std == 0:
            if not lo <= self.mean <= hi:
                raise ValueError(f"normal with std 0 has mean {self.mean:g} outside "
                                 f"[{lo:g}, {hi:g}]")
            return self
        nd = statistics.NormalDist(self.mean, self.std)
        mass = nd.cdf(hi) - nd.cdf(lo)
        if mass < MIN_NORMAL_MASS:
            raise ValueError(f"normal(mean {self.mean:g}, std {self.std:g}) has only "
                             f"{mass:.2%} of its mass in [{lo:g}, {hi:g}] (at least "
                             f"{MIN_NORMAL_MASS:.0%} needed): move the bounds or the mean")
        return self

    def compile(self) -> Draw:
        lo = -math.inf if self.min is None else self.min
        hi = math.inf if self.max is None else self.max
        mean, std, digits = self.mean, self.std, self.digits

        def draw(rng: random.Random, row: dict[str, Any]) -> Any:
            for _ in range(NORMAL_TRIES):
                v = rng.gauss(mean, std)
                if lo <= v <= hi:
                    break
            return _round(min(hi, max(lo, v)), digits)

        return draw


class Uniform(_Spec):
    """A real number in ``[low, high]``, rounded to ``digits`` if given."""

    type: Literal["uniform"]
    low: float
    high: float
    digits: int | None = None

    @model_validator(mode="after")
    def _check(self) -> Uniform:
        if self.low > self.high:
            raise ValueError(f"uniform low {self.low:g} is above high {self.high:g}")
        return self

    def compile(self) -> Draw:
        low, high, digits = self.low, self.high, self.digits
        return lambda rng, row: _round(rng.uniform(low, high), digits)


class Integer(_Spec):
    """An integer in ``[low, high]``, both included, equally likely."""

    type: Literal["integer"]
    low: int
    high: int

    @model_validator(mode="after")
    def _check(self) -> Integer:
        if self.low > self.high:
            raise ValueError(f"integer low {self.low} is above high {self.high}")
        return self

    def compile(self) -> Draw:
        low, high = self.low, self.high
        return lambda rng, row: rng.randint(low, high)


class Conditional(_Spec):
    """The distribution in ``cases`` chosen by another attribute's value (``given``, or ``on``
    as in the example above), else ``default`` (an error if a value has neither)."""

    type: Literal["conditional"]
    given: str = Field(validation_alias=AliasChoices("given", "on"))
    cases: dict[str, Spec]
    default: Spec | None = None

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, data: Any) -> Any:
        # YAML 1.1 reads a bare `on:` key as the boolean true; the user meant the word
        if isinstance(data, dict) and True in data:
            data = {("given" if k is True else k): v for k, v in data.items()}
        return data

    @property
    def on(self) -> str:
        return self.given

    def compile(self) -> Draw:
        on = self.given
        cases = {k: v.compile() for k, v in self.cases.items()}
        default = self.default.compile() if self.default is not None else None

        def draw(rng: random.Random, row: dict[str, Any]) -> Any:
            d = cases.get(str(row[on]), default)
            if d is None:
                raise ConfigError(f"conditional on {on!r}: no case for {row[on]!r} and no "
                                  "default")
            return d(rng, row)

        return draw


Spec = Annotated[Categorical | Normal | Uniform | Integer | Conditional,
                 Field(discriminator="type")]
Conditional.model_rebuild()


def _round(v: float, digits: int | None) -> float | int:
    if digits is None:
        return v
    return round(v) if digits == 0 else round(v, digits)


class PopulationConfig(BaseModel):
    """A population: ``count`` people, ``attributes`` (name -> distribution), a ``seed``, the
    ``template`` of an attribute-only background and the ``prompt`` an LLM is given to write
    one (both ``str.format`` templates over the attributes; ``{attributes}`` is all of them as
    ``name: value`` lines)."""

    model_config = ConfigDict(extra="forbid")

    count: int = Field(ge=0)
    seed: int = 0
    attributes: dict[str, Spec]
    template: str = "{attributes}"
    prompt: str = ("Write a short first-person background (two or three sentences) for a person "
                   "with these attributes, and nothing else:\n{attributes}")
    #: the system message of the background writer
    system: str = "You write realistic, varied character backgrounds."

    @model_validator(mode="after")
    def _check(self) -> PopulationConfig:
        self.order()  # refuses unknown and circular conditions now, not at row 1
        for name, text in (("template", self.template), ("prompt", self.prompt)):
            for _, field, _, _ in string.Formatter().parse(text):
                if field and field != "attributes" and field not in self.attributes:
                    raise ValueError(f"{name} names {{{field}}}, which is not an attribute")
        return self

    def order(self) -> list[str]:
        """Attribute names, each after the ones it is conditional on."""
        deps = {n: _conditions(s) for n, s in self.attributes.items()}
        done: list[str] = []
        state: dict[str, int] = {}

        def visit(n: str, path: list[str]) -> None:
            if state.get(n) == 2:
                return
            if state.get(n) == 1:
                raise ValueError(f"attributes are conditional in a circle: {' -> '.join(path)}")
            state[n] = 1
            for d in deps[n]:
                if d not in self.attributes:
                    raise ValueError(f"attribute {n!r} is conditional on {d!r}, which is not "
                                     "an attribute")
                visit(d, [*path, d])
            state[n] = 2
            done.append(n)

        for n in self.attributes:
            visit(n, [n])
        return done

    def digest(self) -> str:
        """The config's hash (sha256, 16 hex digits), without ``count``: enlarging a population
        keeps the rows already built."""
        canon = json.dumps(self.model_dump(exclude={"count"}), sort_keys=True, default=str)
        return hashlib.sha256(canon.encode()).hexdigest()[:16]


def _conditions(spec: Any) -> set[str]:
    if isinstance(spec, Conditional):
        out = {spec.on}
        for s in [*spec.cases.values(), spec.default]:
            out |= _conditions(s)
        return out
    return set()


def load_config(source: str | Path | dict[str, Any], count: int | None = None,
                seed: int | None = None) -> PopulationConfig:
    """A config from a ``.json``/``.yaml``/``.yml`` file or a dict; ``count`` and ``seed``
    override the file's. Raises ConfigError (one line) for a bad file or config."""
    if isinstance(source, dict):
        data: Any = dict(source)
    else:
        import yaml

        path = Path(source)
        try:
            text = path.read_text()
            data = (yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml")
                    else json.loads(text))
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read population config {path}: "
                              f"{' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"population config {source}: expected a mapping, got "
                          f"{type(data).__name__}")
    if count is not None:
        data["count"] = count
    if seed is not None:
        data["seed"] = seed
    try:
        return PopulationConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"population config: {where + ': ' if where else ''}{msg} "
                          f"({e.error_count()} error(s))") from e


def sample(config: PopulationConfig, i: int) -> dict[str, Any]:
    """Row ``i``'s attributes: the same for the same seed and config, whatever the count."""
    steps = _steps.get(id(config))
    if steps is None or steps[0] is not config:
        steps = (config, [(n, config.attributes[n].compile()) for n in config.order()],
                 list(config.attributes))
        _steps[id(config)] = steps
    rng = random.Random(config.seed * 0x1_0000_0000 + i)
    row: dict[str, Any] = {}
    for name, draw in steps[1]:
        row[name] = draw(rng, row)
    return {name: row[name] for name in steps[2]}  # in the config's order


#: per config: the attributes in sampling order (a million rows must not sort a million times)
_steps: dict[int, tuple[PopulationConfig, list[tuple[str, Any]], list[str]]] = {}


def render(text: str, attributes: dict[str, Any]) -> str:
    listing = "\n".join(f"{k}: {v}" for k, v in attributes.items())
    return text.format(attributes=listing, **attributes)


class BackgroundWriter(Agent):
    """Writes backgrounds with a model, on a worker. A call's content is ``{"system": str,
    "rows": [[id, prompt], ...]}``; the rows run concurrently (the model's per-worker
    ``concurrency`` caps them) and the reply is ``[[id, text or None, usage dict or None,
    error or None], ...]``: a failed row is reported, never fails the batch."""

    def __init__(self, name: str, model_config_name: str) -> None:
        super().__init__(name)
        self.model_config_name = model_config_name

    async def reply(self, x: Msg | None = None) -> list[list[Any]]:
        from . import models

        job = x.content if x is not None else {}
        model = models.get(self.model_config_name)
        system = Msg("system", str(job.get("system", "")), role="system")

        async def one(i: int, prompt: str) -> list[Any]:
            try:
                r = await model.acall([system, Msg("user", prompt, role="user")])
            except ModelError as e:
                return [i, None, None, str(e)]
            text = " ".join(r.text.split())
            if not text:
                return [i, None, None, "the model answered nothing"]
            return [i, text, r.usage.model_dump() if r.usage else None, None]

        return list(await asyncio.gather(*(one(int(i), str(p)) for i, p in job.get("rows", []))))


class BuildReport(BaseModel):
    """What a build did: ``written`` rows this run, ``kept`` from an earlier run, ``failed``
    ids (model builds), tokens used, seconds taken."""

    out: str
    written: int
    kept: int
    failed: list[int] = Field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


def _resume(out: Path, digest: str) -> set[int]:
    """The ids already in ``out`` from this config; cuts off a half-written last line. Raises
    ConfigError if the file holds rows of another config (never mixes two populations)."""
    if not out.exists():
        return set()
    done: set[int] = set()
    end = 0  # the end of the last whole line: read line by line, a big file never in memory
    with out.open("rb+") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break  # a build killed mid-line: the partial row is dropped and rebuilt
            end += len(line)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                got = row["provenance"]["config_hash"]
                i = int(row["id"])
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{out}:{n} is not a population row ({e}); write to another "
                                  "--out") from e
            if got != digest:
                raise ConfigError(f"{out} holds a population of another config (hash {got}, "
                                  f"this one is {digest}); write to another --out or delete it")
            done.add(i)
        f.truncate(end)
    return done


def build(config: PopulationConfig, out: str | Path, model_config_name: str | None = None,
          writers: int = 4, batch: int = BATCH, progress: bool = True,
          on_row: Callable[[int], None] | None = None) -> BuildReport:
    """Build (or resume) the population ``config`` into ``out`` (JSON lines).

    Without ``model_config_name`` the backgrounds come from ``config.template`` (no Redis
    needed). With one, ``writers`` BackgroundWriter agents on workers (``busagent.init()``
    first; child workers are started if none can host them) write them, ``batch`` rows per
    call. ``on_row(id)`` is called after each row is written (tests use it to kill a build).
    Raises ConfigError, ModelError when rows still failed after ``ROW_RETRIES`` sends (the
    others are written; re-running retries them), BusError."""
    import time

    from tqdm import tqdm

    t0 = time.perf_counter()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = config.digest()
    done = _resume(path, digest)
    todo = (i for i in range(config.count) if i not in done)
    remaining = config.count - len([i for i in done if i < config.count])
    model_name = None
    if model_config_name:
        from . import models

        model_name = {"config_name": model_config_name,
                      "model_name": models.get(model_config_name).config.model_name}
    prov = {"config_hash": digest, "seed": config.seed, "model": model_name}
    report = BuildReport(out=str(path), written=0, kept=len(done))
    bar = tqdm(total=config.count, initial=config.count - remaining, unit="row",
               disable=not progress, desc="population", smoothing=0.05)
    with path.open("a", encoding="utf-8") as f:

        def write(i: int, attrs: dict[str, Any], background: str) -> None:
            f.write(json.dumps({"id": i, "attributes": attrs, "background": background,
                                "provenance": prov}, ensure_ascii=False) + "\n")
            report.written += 1
            bar.update(1)
            if on_row is not None:
                f.flush()
                on_row(i)

        try:
            if model_config_name is None:
                for i in todo:
                    attrs = sample(config, i)
                    write(i, attrs, render(config.template, attrs))
            else:
                asyncio.run(_write_with_model(config, model_config_name, todo, write, f.flush,
                                              report,
                                              max(1, writers), max(1, batch)))
        finally:
            bar.close()
    report.seconds = round(time.perf_counter() - t0, 3)
    if report.failed:
        raise ModelError(f"{len(report.failed)} background(s) failed after {ROW_RETRIES + 1} "
                         f"tries (first ids {report.failed[:5]}); {report.written} were written "
                         f"to {path}: run the build again to retry the rest")
    return report


async def _write_with_model(config: PopulationConfig, model_config_name: str,
                            todo: Iterator[int],
                            write: Callable[[int, dict[str, Any], str], None],
                            flush: Callable[[], None], report: BuildReport, writers: int,
                            batch: int) -> None:
    import busagent

    agents = [BackgroundWriter(f"background-writer-{k}", model_config_name).to_dist()
              for k in range(writers)]
    try:
        for a in agents:
            await asyncio.get_running_loop().run_in_executor(None, a.ready)
        attrs: dict[int, dict[str, Any]] = {}
        tries: dict[int, int] = {}
        retry: list[int] = []
        inflight: dict[asyncio.Future[Any], int] = {}
        turn = 0

        def next_batch() -> list[int]:
            ids = retry[:batch]
            del retry[:batch]
            for i in todo:
                ids.append(i)
                if len(ids) >= batch:
                    break
            return ids

        def send(ids: list[int]) -> None:
            nonlocal turn
            rows = []
            for i in ids:
                attrs.setdefault(i, sample(config, i))
                rows.append([i, render(config.prompt, attrs[i])])
            writer = agents[turn % len(agents)]
            turn += 1
            p = writer(Msg("population", {"system": config.system, "rows": rows}))
            inflight[asyncio.ensure_future(busagent.agather([p], timeout=None))] = len(ids)

        # Two batches per writer in flight keep every writer's model calls going while the
        # caller reads and writes the last batch's rows.
        for _ in range(2 * len(agents)):
            ids = next_batch()
            if not ids:
                break
            send(ids)
        while inflight:
            finished, _ = await asyncio.wait(list(inflight), return_when=asyncio.FIRST_COMPLETED)
            for fut in finished:
                inflight.pop(fut)
                for i, text, usage, _err in fut.result()[0]:
                    if text is not None:
                        write(i, attrs.pop(i), text)
                        if usage:
                            report.prompt_tokens += int(usage.get("prompt", 0))
                            report.completion_tokens += int(usage.get("completion", 0))
                        continue
                    tries[i] = tries.get(i, 0) + 1
                    if tries[i] > ROW_RETRIES:
                        report.failed.append(i)
                        attrs.pop(i, None)
                    else:
                        retry.append(i)
                ids = next_batch()
                if ids:
                    send(ids)
            flush()
    finally:
        for a in agents:
            # cleanup must not hide the build's own error
            with contextlib.suppress(Exception):
                a.delete()


def read(path: str | Path) -> list[dict[str, Any]]:
    """A built population's rows, in id order. Raises ConfigError for a missing or bad file."""
    rows = []
    try:
        with Path(path).open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as e:
                        raise ConfigError(f"{path}:{n} is not a JSON row: {e}") from e
    except OSError as e:
        raise ConfigError(f"cannot read population {path}: {e}") from e
    rows.sort(key=lambda r: int(r.get("id", 0)))
    return rows
