"""What a provider module declares: its name, the channels it serves, its settings (a pydantic
sub-model whose fields become PGNOTIFY_* variables), how it is built and its default rate. The
registry and the settings are tables built from these declarations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, SecretStr

from pgnotify_worker.ports import Provider

if TYPE_CHECKING:
    from pgnotify_worker.adapters.db import QueueStore
    from pgnotify_worker.adapters.inbound import Endpoint
    from pgnotify_worker.config import CoreSettings


class ProviderSettings(BaseModel):
    """Base of a provider's settings. Its fields are validated as part of the whole Settings
    (config.Settings inherits them all), so the class's own validator is built only if something
    else is validated with it (defer_build; bench/results/memory.md)."""

    model_config = ConfigDict(defer_build=True)


class NoSettings(ProviderSettings):
    """A provider without settings of its own."""


S = TypeVar("S", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Context:
    """What a provider may use besides its own settings: the shared ones and the store."""

    settings: CoreSettings
    store: QueueStore


@dataclass(frozen=True, slots=True)
class ProviderSpec(Generic[S]):
    """One provider, as its module declares it (module attribute SPECS)."""

    name: str
    channels: frozenset[str]
    settings: type[S]
    build: Callable[[S, Context], Provider]
    default_rate: str | None = None  # rate/burst when PGNOTIFY_RATE_LIMITS names none
    dev_sink: bool = False  # console/file: used only when the user chose them
    inbound: Callable[[S], Endpoint | None] | None = None  # its delivery-report endpoint

    def own(self, settings: Any) -> S:
        """Its settings out of the full settings: config.Settings is already one (it subclasses
        every provider's settings, validated), anything else is validated field by field."""
        if isinstance(settings, self.settings):
            return settings  # what model_validate returns for an instance, without building it
        return self.settings.model_validate(settings, from_attributes=True)

    def endpoint(self, settings: Any) -> Endpoint | None:
        """Its report endpoint, when it has one and it is configured."""
        if self.inbound is None:
            return None
        return self.inbound(self.own(settings))

    def create(self, settings: Any, context: Context) -> Provider:
        """Build the provider from the full settings (its own fields are read from them)."""
        return self.build(self.own(settings), context)


def reveal(value: SecretStr | None) -> str | None:
    """The plain value of a secret setting (at the one place that hands it to a client)."""
    return value.get_secret_value() if value is not None else None
