"""`fxcompress run RECIPE.yaml`: dense training, then each pass of the recipe with its fine-tuning, a
checkpoint after every step, and a rerun that resumes after the last finished step.

The output folder holds `state.json` (each finished step's fingerprint and accuracy), `dense.pt` (the
trained dense weights, a plain state dict), `step-NN.fxc` (each step's model in the pickle-free file
format), `sensitivity.json` (the dense model's sensitivity table, when the recipe's `sensitivity:`
asks for the report's curves), and at the end `model.fxc`, `summary.md` and the report (`report.html` with its pictures, and
`report.md`). A step is skipped on a rerun when its
checkpoint exists and its fingerprint (everything the step depends on: model, data, seeds, training,
the steps up to it) is unchanged; the first changed step and all later ones run again.
"""
from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..compile import compile as compile_model
from ..distill import DistillationLoss
from ..errors import ConfigError, FxCompressError
from ..execution import evaluating
from ..fileformat import load, save, to_bytes
from ..report import write_report
from ..sensitivity import SensitivityTable, prunable_layers, sensitivity
from ..summary import summary
from ..training import evaluate, torch_threads, train
from .data import DATASETS, as_channels, image_folder_classes, subset
from .models import LogitsOf, build, computes_with, export_free_batch
from .recipe import Recipe, Step, Training, load_recipe, shipped_recipes

STATE = "state.json"


def data_shape(recipe: Recipe) -> tuple[int, int, int]:
    """(channels, side, classes) the model is built for, known before any image is read."""
    spec, kind = recipe.data, DATASETS[recipe.data["name"]]
    side = spec.get("image_size", kind.shape.image_size)
    if side is None:
        raise recipe.error(("data",), f"data {spec['name']} needs image_size (its images are resized to it)")
    classes = kind.shape.num_classes
    if classes is None:
        classes = image_folder_classes(Path(spec["root"]))
    return spec.get("channels", kind.shape.channels), side, classes


def check_files(recipe: Recipe) -> None:
    """The data set's root and files exist (before any work)."""
    spec, kind = recipe.data, DATASETS[recipe.data["name"]]
    if kind.needs_root and "root" not in spec:
        raise recipe.error(("data",), f"data {spec['name']} needs root: the folder holding {', '.join(kind.files)}")
    if "root" in spec:
        missing = [f for f in kind.files if not (Path(spec["root"]) / f).exists()]
        if not Path(spec["root"]).is_dir() or missing:
            raise recipe.error(("data", "root"), f"data.root {spec['root']!r} does not hold "
                                                 f"{', '.join(missing or kind.files)}")


def load_data(recipe: Recipe, shape: tuple[int, int, int]):
    """The recipe's data set, capped as its quick: says in a quick run."""
    return _quick_subset(recipe, _whole_data(recipe, shape))


def _whole_data(recipe: Recipe, shape: tuple[int, int, int]):
    spec = recipe.data
    root = Path(spec["root"]) if "root" in spec else None
    return as_channels(DATASETS[spec["name"]].load(root, shape[1]), shape[0])


def _quick_subset(recipe: Recipe, data):
    return subset(data, recipe.quick["train_samples"], recipe.quick["test_samples"]) if recipe.quick else data


def calibration_batches(recipe: Recipe, data) -> list[torch.Tensor]:
    """The first `batches` x `batch_size` training images of the whole data set (a quick run's cap on the
    training set does not shrink them), in batches. A calibration: the data set cannot fill is refused at
    its line: a batch past the end would be empty (observers fail on it after the training; channel
    reconstruction would silently use fewer images). The default calibration takes what there is."""
    batches, size = recipe.calibration["batches"], recipe.calibration["batch_size"]
    images = data.train_x
    if batches * size > len(images) and "calibration" in recipe.doc.data:
        raise recipe.error(("calibration",), f"calibration: {batches} batches of {size} need {batches * size} "
                                             f"training images; data {data.name} holds {len(images)}")
    return [images[i:i + size] for i in range(0, min(batches * size, len(images)), size)]


def _epochs(recipe: Recipe, training: Training) -> int:
    return min(training.epochs, recipe.quick["epochs"]) if recipe.quick else training.epochs


def _finetune(recipe: Recipe, gm: nn.Module, data, training: Training | None, index: int,
              teacher: nn.Module | None, hook: Callable[[int], None] | None) -> None:
    if training is None or _epochs(recipe, training) == 0:
        return
    loss = None
    if training.distill:
        loss = DistillationLoss(teacher, training.distill["temperature"], training.distill["alpha"])
    train(gm, data, _epochs(recipe, training), lr=training.lr, batch_size=training.batch_size,
          seed=recipe.seed + index, loss=loss, step_hook=hook, progress=True, optimizer=training.optimizer)


def dry_run(recipe: Recipe, model: nn.Module, example: tuple,
            calibration: list) -> torch.export.ExportedProgram | None:
    """Every step compiled (and its checkpoint written to memory) once on the untrained model: a model
    that does not fit the data, a pass that cannot run or a model the file format cannot hold fails
    here, at its line, before any training. Returns the export of a transformers classifier: of the
    model itself, so it holds the model's own tensors and step 1 compiles it after the dense training
    (which writes them in place) instead of exporting the model a second time."""
    try:
        with evaluating(model):
            model(*example)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise recipe.error(("model",), f"model {recipe.model} cannot run on the {recipe.data['name']} images "
                                       f"{tuple(example[0].shape)}: {_one_line(exc)[:300]}") from None
    exported = export_free_batch(model, example) if isinstance(model, LogitsOf) else None
    gm = exported if exported is not None else copy.deepcopy(model).eval()
    for step in recipe.steps:
        try:
            gm = compile_model(gm, [step.make()], example_inputs=example, calibration_data=calibration)
            to_bytes(gm)
        except FxCompressError as exc:
            raise recipe.error(("steps", step.index, "pass"), f"steps[{step.index}] ({step.name}) cannot run: "
                                                               f"{_one_line(exc)}") from None
    if recipe.sensitivity is not None:  # the sweep runs after the dense training: its layers are checked now
        try:
            prunable_layers(model, recipe.sensitivity["layers"])
        except ConfigError as exc:
            raise recipe.error(("sensitivity", "layers"), _one_line(exc)) from None
    return exported


def _build(recipe: Recipe, shape: tuple[int, int, int]) -> nn.Module:
    """The recipe's model; a bad spec or argument is reported at its line of the recipe."""
    try:
        return build(recipe.model, recipe.model_args, shape)
    except ConfigError as exc:  # at the model_args line when the message is about them
        about_args = recipe.model_args and any(word in str(exc) for word in ("config", "field", "built with"))
        raise recipe.error(("model_args",) if about_args else ("model",), str(exc)) from None


def _compilable(model: nn.Module, example: tuple, exported: torch.export.ExportedProgram | None = None):
    """What the first compile takes: a transformers classifier exported with a free batch size (compile's
    own export would fix it at the example's two images); any other model as it is. `exported`, the dry
    run's export of this model, is taken while it still computes with the model's own tensors (an export
    is about a second of CPU for a small ViT)."""
    if not isinstance(model, LogitsOf):
        return model
    if exported is not None and computes_with(exported, model):
        return exported
    return export_free_batch(model, example)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class Run:
    """One execution of a recipe into an output folder."""

    def __init__(self, recipe: Recipe, out: Path, log: Callable[[str], None] = print,
                 exported: torch.export.ExportedProgram | None = None) -> None:
        self.recipe, self.out, self.log = recipe, out, log
        self.exported = exported  # the dry run's export of the recipe's model (see dry_run)
        self.state = self._read_state()

    def _read_state(self) -> dict:
        """What earlier runs finished; a state file this run cannot read means nothing is finished (every
        step runs again, its checkpoint rewritten), said in the log."""
        path = self.out / STATE
        if not path.is_file():
            return {"dense": None, "steps": []}
        try:
            state = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            state = None
        if not (isinstance(state, dict) and isinstance(state.get("steps"), list)
                and all(_finished_step(entry) for entry in state["steps"])):
            self.log(f"warning: {path} is damaged; it is ignored and every step runs again")
            return {"dense": None, "steps": []}
        return state

    def _write_state(self) -> None:
        temp = self.out / (STATE + ".tmp")
        temp.write_text(json.dumps(self.state, indent=1))
        temp.replace(self.out / STATE)

    def dense(self, model: nn.Module, data) -> float:
        recipe, path = self.recipe, self.out / "dense.pt"
        fingerprint = recipe.fingerprint
        if self.state.get("dense") == fingerprint and path.is_file():
            model.load_state_dict(torch.load(path, weights_only=True))
            self.log("dense training: done before, loaded dense.pt")
        else:
            self.state = {"dense": None, "steps": []}
            epochs = _epochs(recipe, recipe.train)
            if epochs:
                train(model, data, epochs, lr=recipe.train.lr, batch_size=recipe.train.batch_size, seed=recipe.seed,
                      progress=True, optimizer=recipe.train.optimizer)
            torch.save(model.state_dict(), path)
            self.state["dense"] = fingerprint
            self._write_state()
        model.eval()
        accuracy = evaluate(model, data.test_x, data.test_y)
        self.log(f"dense: accuracy {accuracy:.4f}")
        return accuracy

    def sensitivity(self, model: nn.Module, data) -> SensitivityTable | None:
        """The dense model's sensitivity curves when the recipe asks: read from sensitivity.json when a
        run of the same dense model and sweep wrote it, else swept now and written there."""
        asked = self.recipe.sensitivity
        if asked is None:
            return None
        path, fingerprint = self.out / "sensitivity.json", [self.recipe.fingerprint, repr(sorted(asked.items()))]
        if self.state.get("sensitivity") == fingerprint and path.is_file():
            self.log("sensitivity: done before, loaded sensitivity.json")
            return SensitivityTable.load(path)
        table = sensitivity(model, lambda m: evaluate(m, data.test_x, data.test_y), asked["sparsities"],
                            asked["granularity"], layers=asked["layers"], progress=True, metric="test accuracy")
        table.save(path)
        self.state["sensitivity"] = fingerprint
        self._write_state()
        self.log(table.to_text())
        return table

    def finished(self, step: Step) -> Path | None:
        done = self.state["steps"]
        path = self.out / f"step-{step.index + 1:02d}.fxc"
        if step.index < len(done) and done[step.index].get("fingerprint") == step.fingerprint and path.is_file():
            return path
        return None

    def _finetune_step(self, step: Step, pass_, gm: nn.Module, data, teacher) -> None:
        """Fine-tune after the pass; a gradual-pruning schedule advances the masks at every optimizer step."""
        schedule = getattr(pass_, "schedule", None)
        steps = [0]

        def hook(s: int) -> None:
            steps[0] = s
            pass_.update_masks(gm, s)

        _finetune(self.recipe, gm, data, step.finetune, step.index + 1, teacher, hook if schedule else None)
        if schedule is not None and steps[0] < schedule.end:
            # fewer optimizer steps than the schedule (a --quick run): the masks still end at the target
            pass_.update_masks(gm, schedule.end)
            self.log(f"step {step.name}: the schedule ends at step {schedule.end}, fine-tuning stopped at "
                     f"{steps[0]}; masks set to the final sparsity")

    def step(self, step: Step, gm: nn.Module, data, example, calibration, teacher) -> tuple[nn.Module, float]:
        done = self.finished(step)
        if done is not None:
            gm = load(done)
            accuracy = self.state["steps"][step.index]["accuracy"]
            self.log(f"step {step.name}: done before, loaded {done.name} (accuracy {accuracy:.4f})")
            return gm, accuracy
        del self.state["steps"][step.index:]
        torch.manual_seed(self.recipe.seed + step.index + 1)
        pass_ = step.make()
        gm = compile_model(_compilable(gm, example, self.exported), [pass_], example_inputs=example,
                           calibration_data=calibration, progress=True)
        self._finetune_step(step, pass_, gm, data, teacher)
        accuracy = evaluate(gm, data.test_x, data.test_y)
        path = self.out / f"step-{step.index + 1:02d}.fxc"
        save(gm, path)
        self.state["steps"].append({"name": step.name, "fingerprint": step.fingerprint, "accuracy": accuracy,
                                    "file": path.name})
        self._write_state()
        self.log(f"step {step.name}: accuracy {accuracy:.4f}")
        return gm, accuracy


def _finished_step(entry) -> bool:
    """A step entry of state.json as Run.step writes it: its name, fingerprint, accuracy and file."""
    return (isinstance(entry, dict) and all(isinstance(entry.get(key), str) for key in ("name", "fingerprint", "file"))
            and isinstance(entry.get("accuracy"), (int, float)) and not isinstance(entry["accuracy"], bool))


def run_recipe(path: str | Path, out: str | Path | None, quick: bool = False,
               log: Callable[[str], None] = print, check_only: bool = False) -> dict:
    """Validate the recipe (a file, or a shipped recipe's name), then run (or resume) it into `out`;
    returns the accuracies, the file size and the final model. `check_only`: stop after the validation and the dry run
    (no training, nothing written) and return {"checked": recipe file}."""
    recipe = load_recipe(path, quick=quick)
    check_files(recipe)
    shape = data_shape(recipe)
    torch.manual_seed(recipe.seed)
    model = _build(recipe, shape)
    with torch_threads(recipe.threads):
        whole = _whole_data(recipe, shape)
        data = _quick_subset(recipe, whole)
        example = (data.test_x[:2],)
        calibration = calibration_batches(recipe, whole)
        exported = dry_run(recipe, model, example, [data.train_x[:32]])  # a small batch: it checks structure
        if check_only:
            log(f"{recipe.doc.name}: valid; every step compiles on {recipe.model} with {data.name} images")
            return {"checked": recipe.doc.name}
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        return _execute(Run(recipe, out, log, exported), model, data, example, calibration)


def _execute(run: Run, model: nn.Module, data, example, calibration) -> dict:
    recipe, out = run.recipe, run.out
    dense = run.dense(model, data)
    curves = run.sensitivity(model, data)
    teacher = copy.deepcopy(model).eval() if any(s.finetune and s.finetune.distill for s in recipe.steps) else None
    gm, accuracies, before = model, [], model
    for step in recipe.steps:
        before = gm  # the last step's input: a lowered model's weights before quantization are there
        gm, accuracy = run.step(step, gm, data, example, calibration, teacher)
        accuracies.append(accuracy)
    file_bytes = save(gm, out / "model.fxc")
    table = summary(gm, example)
    dense_bytes = 4 * sum(p.numel() for p in model.parameters())
    lines = [f"# {recipe.doc.name}", "", f"data: {data.name}, {len(data.train_x)} train / {len(data.test_x)} test"
             + (" (quick)" if recipe.quick else ""), "", "| step | accuracy |", "|---|---:|",
             f"| dense | {dense:.4f} |", *(f"| {s.name} | {a:.4f} |" for s, a in zip(recipe.steps, accuracies)),
             "", table.to_markdown(), "", f"model.fxc: {file_bytes} bytes; fp32 parameters: {dense_bytes} bytes "
             f"({dense_bytes / file_bytes:.1f}x)", "", "```", table.history, "```", ""]
    (out / "summary.md").write_text("\n".join(lines))
    facts = {"recipe": recipe.doc.name, "data": f"{data.name}" + (" (quick)" if recipe.quick else ""),
             "accuracy": f"dense {dense:.4f} -> {accuracies[-1]:.4f}" if accuracies else f"dense {dense:.4f}",
             "model.fxc": f"{file_bytes} bytes ({dense_bytes / file_bytes:.1f}x smaller than fp32)"}
    report = write_report(gm, out / "report.html", title=f"{recipe.doc.name}: {recipe.model}", facts=facts,
                          reference=before if _same_shapes(before, gm) else None, example_inputs=example,
                          sensitivity=curves)
    run.log(table.to_text(with_history=False))
    run.log(f"model.fxc: {file_bytes} bytes, {dense_bytes / file_bytes:.1f}x smaller than the fp32 parameters; "
            f"accuracy dense {dense:.4f} -> {accuracies[-1]:.4f}; written to {out} (report: {report.html.name})")
    return {"dense_accuracy": dense, "accuracies": accuracies, "file_bytes": file_bytes,
            "dense_bytes": dense_bytes, "out": str(out), "model": gm}


def _same_shapes(before: nn.Module, after: nn.Module) -> bool:
    """Whether `before` can lend `after` its weights before quantization: no tensor both hold changed
    shape (channel pruning shrinks them; lowering only renames the weights it encodes)."""
    held = {name: tuple(t.shape) for name, t in before.state_dict().items()}
    return before is not after and all(held.get(name, tuple(t.shape)) == tuple(t.shape)
                                       for name, t in after.state_dict().items())


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("run", help="run a compression recipe (YAML), resuming from its checkpoints",
                                 description="Validate a recipe, then train, compress and fine-tune as it says; "
                                             "a checkpoint after each step lets a rerun resume.")
    parser.add_argument("recipe", help="the recipe file (YAML), or the name of a shipped recipe: "
                                       + ", ".join(shipped_recipes()))
    parser.add_argument("--out", help="output folder (default: runs/<recipe name>)")
    parser.add_argument("--quick", action="store_true", help="cap epochs and data as the recipe's quick: says")
    parser.add_argument("--check", action="store_true",
                        help="only validate the recipe and compile every step on the untrained model")
    parser.set_defaults(handler=_command)


def _command(args: argparse.Namespace) -> int:
    run_recipe(args.recipe, args.out or Path("runs") / Path(args.recipe).stem, args.quick, check_only=args.check)
    return 0
