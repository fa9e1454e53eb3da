"""A test model with a fault switch: the wrapped version's answers, and failures once a file exists.

Logged to MLflow as a model from code (this file travels with the model), so the gateway loads it like
any other version: signed, verified, warmed. `model_config`: `switch`, the path whose existence turns
the fault on, and `error_rate`, the share of model calls that then fail.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel, PythonModelContext


class FaultSwitchModel(PythonModel):  # type: ignore[misc]
    """The inner model's predictions; while the switch file exists, `error_rate` of the calls raise."""

    def load_context(self, context: PythonModelContext) -> None:
        self.inner = mlflow.pyfunc.load_model(context.artifacts["inner"])
        self.switch = Path(context.model_config["switch"])
        self.error_rate = float(context.model_config.get("error_rate", 0.2))

    def predict(self, context: PythonModelContext, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        if self.switch.exists() and random.random() < self.error_rate:
            raise RuntimeError(f"fault switch {self.switch} is on")
        return self.inner.predict(model_input)


mlflow.models.set_model(FaultSwitchModel())


def register(model: str, inner_version: str, switch: Path, error_rate: float, workdir: Path) -> str:
    """Register a fault-switch version of `model` wrapping `inner_version`, with its release data; not yet signed."""
    from releasegate import registry
    from releasegate.demo.models import EXPERIMENT

    inner_dir = registry.download_model(model, inner_version, dst=workdir / "inner")
    info = mlflow.models.get_model_info(f"models:/{model}/{inner_version}")
    example = mlflow.models.Model.load(str(inner_dir)).load_input_example(str(inner_dir))
    experiment = registry.client().get_experiment_by_name(EXPERIMENT).experiment_id
    with mlflow.start_run(experiment_id=experiment, run_name=f"{model}-fault-switch"):
        logged = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__)),
            artifacts={"inner": str(inner_dir)},
            model_config={"switch": str(switch), "error_rate": error_rate},
            signature=info.signature,
            input_example=example,
            registered_model_name=model,
            pip_requirements=[f"mlflow=={mlflow.__version__}"],
        )
    version = str(logged.registered_model_version)
    for name in ("reference.parquet", "holdout.parquet"):
        local = registry.download_artifact(
            model, inner_version, f"releasegate/{name}", dst=workdir / name.split(".")[0]
        )
        registry.log_artifact(model, version, local, artifact_path="releasegate")
    return version
