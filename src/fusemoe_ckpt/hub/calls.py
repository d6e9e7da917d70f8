"""Talking to the Hub: its errors as one-line HubErrors, and its progress bars on or off.

Every setting is huggingface_hub's own (HF_TOKEN, HF_HOME, HF_HUB_CACHE, HF_ENDPOINT,
HF_HUB_OFFLINE, HF_HUB_DISABLE_PROGRESS_BARS): nothing here overrides them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx2
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

from ..errors import HubError


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """huggingface_hub's own bars, switched off for --quiet and restored afterwards."""
    was_disabled = are_progress_bars_disabled()
    if enabled or was_disabled:
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


@contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """Turn huggingface_hub's and the transport's errors into one-line HubErrors, cause chained."""
    endpoint = constants.ENDPOINT
    try:
        yield
    except GatedRepoError as e:
        repo = what.split("@")[0]
        raise HubError(
            f"{what}: gated repo; request access at {endpoint}/{repo}, then set HF_TOKEN to a token of that account"
        ) from e
    except RepositoryNotFoundError as e:
        raise HubError(
            f"{what}: no model repo of that name on {endpoint}, and no local directory either "
            "(a private repo needs HF_TOKEN with access)"
        ) from e
    except RevisionNotFoundError as e:
        raise HubError(f"{what}: the repo has no such branch, tag or commit") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        if constants.HF_HUB_OFFLINE:
            raise HubError(
                f"{what}: HF_HUB_OFFLINE is set and the cache {constants.HF_HUB_CACHE} lacks it; "
                "download it once online, or unset HF_HUB_OFFLINE"
            ) from e
        raise HubError(
            f"{what}: cannot reach the Hub at {endpoint} ({root_cause(e)}) and the cache "
            f"{constants.HF_HUB_CACHE} lacks it; check the network or HF_ENDPOINT"
        ) from e
    except httpx2.TransportError as e:
        raise HubError(f"{what}: cannot reach the Hub at {endpoint} ({root_cause(e)}); check the network") from e
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        detail = e.server_message.strip().splitlines()[0] if e.server_message else "no message"
        raise HubError(f"{what}: the Hub at {endpoint} answered {status}: {detail}") from e


def root_cause(error: BaseException) -> str:
    """The innermost cause of `error`, as `Type: first line`."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
