"""/v1/models: the model the workers serve, as OpenAI's API lists models."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter

from service.contract import Settings
from service.deps import SettingsDep, TenantDep
from service.errors import APIError, openai_responses
from service.openai_schemas import ModelList, ModelObject

router = APIRouter(prefix="/v1/models", tags=["models"])


def served_model(settings: Settings) -> ModelObject:
    checkpoint = Path(settings.model)
    created = int(checkpoint.stat().st_mtime) if checkpoint.exists() else 0
    return ModelObject(id=settings.served_model, created=created, owned_by="videoqa")


@router.get("", response_model=ModelList, responses=openai_responses(401))
def list_models(settings: SettingsDep, tenant: TenantDep) -> ModelList:
    """The served model (one: every worker loads the same checkpoint)."""
    return ModelList(data=[served_model(settings)])


@router.get("/{model}", response_model=ModelObject, responses=openai_responses(401, 404))
def retrieve_model(model: str, settings: SettingsDep, tenant: TenantDep) -> ModelObject:
    """The served model, by its id."""
    if model != settings.served_model:
        raise APIError(404, "model_not_found", f"the model {model!r} does not exist", param="model")
    return served_model(settings)
