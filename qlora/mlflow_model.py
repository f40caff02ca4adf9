"""The MLflow pyfunc wrapper of a saved adapter, logged as a "model from code" (no pickled objects).

    model = mlflow.pyfunc.load_model("models:/NAME/VERSION")
    model.predict(["Extract the data: ..."])          # -> list of completions

MLflow runs this file to get the model object; it needs the qlora package and the pinned runtime
packages recorded in the model's requirements.
"""
from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel


class AdapterModel(PythonModel):
    def load_context(self, context):
        import torch

        from qlora import adapters
        folder = Path(context.artifacts["config"]).parent
        self.cfg = adapters.read_config(folder)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer = adapters.load_for_inference(self.cfg, folder, device)

    # predict takes a DataFrame (a "prompt" column, or a classifier's input columns) or a plain list of prompts or
    # records, and checks them itself (tasks.*.predict). MLflow's type-hint validation would only warn (at every
    # log_model) that there are no hints, or that a DataFrame hint gives no signature.
    _skip_type_hint_validation = True

    def predict(self, context, model_input, params=None):
        from qlora import tasks
        task = tasks.for_config(self.cfg)
        if task.can_generate:  # prompts -> completions
            inputs = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        else:  # rows of input columns (or texts) -> classes
            inputs = model_input.to_dict("records") if hasattr(model_input, "columns") else list(model_input)
        max_new = int((params or {}).get("max_new_tokens", self.cfg.evaluation.max_new_tokens))
        return task.predict(self.model, self.tokenizer, self.cfg, inputs, max_new)


mlflow.models.set_model(AdapterModel())
