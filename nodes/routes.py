"""HTTP routes for MoLE training jobs; ComfyUI also serves each one under ``/api``.

======  ==============================  ===================================================
GET     ``/mole/jobs``                  ``{"jobs": [job, ...]}`` (oldest first)
GET     ``/mole/jobs/{id}``             one job with its ``history`` (loss, entropy, mean gates per step)
POST    ``/mole/jobs/{id}/cancel``      stop at the next step, checkpoint kept
POST    ``/mole/jobs/{id}/finish``      stop at the next step and save the gates as they are
POST    ``/mole/jobs/{id}/resume``      queue a cancelled/failed job again from its checkpoint
GET     ``/mole/runs/{node}``           the last sampling run of MoLE Apply node ``node``: expert names,
                                        gate statistics (mean gates per scope and timestep bucket),
                                        component, time
======  ==============================  ===================================================

Errors use real status codes with ``{"error": "..."}``: 404 for an unknown job or a node without a
sampling run, 400 for a malformed
id or a request the job's state does not allow. Handlers only flip flags or read state, so they answer
at once while a job trains.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

from aiohttp import web

from . import jobs
from .injection import last_run

_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NODE_ID = re.compile(r"^[A-Za-z0-9_:.-]{1,64}$")  # ComfyUI node ids: "3", subgraph paths "12:3"
_registered = False


def register_routes() -> bool:
    """Add the routes to the running PromptServer (idempotent); False when there is no server (tests)."""
    global _registered
    server = sys.modules.get("server")  # main.py imports it before custom nodes; never import it ourselves
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if _registered or instance is None:
        return _registered
    routes = instance.routes
    routes.get("/mole/jobs")(list_jobs)
    routes.get("/mole/jobs/{job_id}")(job_state)
    routes.post("/mole/jobs/{job_id}/cancel")(cancel_job)
    routes.post("/mole/jobs/{job_id}/finish")(finish_job)
    routes.post("/mole/jobs/{job_id}/resume")(resume_job)
    routes.get("/mole/runs/{node_id}")(node_run)
    _registered = True
    return True


async def list_jobs(request: web.Request) -> web.Response:
    return web.json_response({"jobs": jobs.list_jobs()})


async def job_state(request: web.Request) -> web.Response:
    return _answer(request, jobs.state)


async def cancel_job(request: web.Request) -> web.Response:
    return _answer(request, jobs.cancel)


async def finish_job(request: web.Request) -> web.Response:
    return _answer(request, jobs.finish)


async def resume_job(request: web.Request) -> web.Response:
    return _answer(request, jobs.resume)


async def node_run(request: web.Request) -> web.Response:
    node_id = request.match_info["node_id"]
    if not _NODE_ID.match(node_id):
        return web.json_response({"error": f"malformed node id {node_id[:80]!r}"}, status=400)
    run = last_run(node_id)
    if run is None:
        return web.json_response({"error": f"no sampling run of a MoLE Apply node {node_id!r}"}, status=404)
    return web.json_response(run)


def _answer(request: web.Request, action: Callable[[str], dict]) -> web.Response:
    job_id = request.match_info["job_id"]
    if not _JOB_ID.match(job_id):
        return web.json_response({"error": f"malformed job id {job_id[:80]!r}"}, status=400)
    try:
        return web.json_response(action(job_id))
    except KeyError:
        return web.json_response({"error": f"no job {job_id!r}"}, status=404)
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
