"""Run the Pulumi program under pulumi.runtime mocks and record every resource.

Imported by the infra tests (and run as a script for the variant-config test): sets the
mocks before importing the program, as Pulumi's unit-testing guide requires. Besides
each resource's inputs (the mocks), the monitor records what ``new_resource`` is not
told: each resource's parent and aliases, and the outputs each component registers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path

import pulumi
from pulumi.runtime import mocks, rpc

INFRA = Path(__file__).resolve().parents[2] / "infra"
sys.path.insert(0, str(INFRA))


COMPUTE_COLLECTIONS = {
    "gcp:compute/regionNetworkEndpointGroup:RegionNetworkEndpointGroup": (
        "regions/us-east1/networkEndpointGroups"
    ),
    "gcp:compute/backendService:BackendService": "global/backendServices",
    "gcp:compute/globalAddress:GlobalAddress": "global/addresses",
    "gcp:compute/managedSslCertificate:ManagedSslCertificate": "global/sslCertificates",
    "gcp:compute/uRLMap:URLMap": "global/urlMaps",
    "gcp:compute/targetHttpsProxy:TargetHttpsProxy": "global/targetHttpsProxies",
    "gcp:compute/globalForwardingRule:GlobalForwardingRule": "global/forwardingRules",
}


class RecordingMocks(pulumi.runtime.Mocks):
    def __init__(self) -> None:
        self.resources: list[pulumi.runtime.MockResourceArgs] = []

    def new_resource(self, args):
        outputs = dict(args.inputs)
        kind = COMPUTE_COLLECTIONS.get(args.typ)
        if kind:  # ids and self links as the Compute API returns them
            outputs["id"] = f"projects/proj/{kind}/{args.inputs['name']}"
            outputs["selfLink"] = f"https://www.googleapis.com/compute/v1/{outputs['id']}"
        if args.typ == "gcp:compute/globalAddress:GlobalAddress":
            outputs["address"] = "203.0.113.7"
        if args.typ == "gcp:serviceaccount/account:Account":
            outputs["email"] = f"{args.inputs['accountId']}@proj.iam.gserviceaccount.com"
            outputs["name"] = f"projects/proj/serviceAccounts/{outputs['email']}"
        if args.typ == "gcp:cloudfunctionsv2/function:Function":
            outputs["url"] = f"https://{args.inputs['name']}-xyz.a.run.app"
        if args.typ == "gcp:pubsub/topic:Topic":
            outputs["id"] = f"projects/proj/topics/{args.inputs['name']}"
        self.resources.append(args)
        return [outputs.get("id", f"{args.name}_id"), outputs]

    def call(self, args):
        if args.token == "gcp:organizations/getProject:getProject":
            return {"number": "123456789", "projectId": "proj"}
        return {}


@dataclasses.dataclass(frozen=True)
class Registration:
    """One resource as the engine would see it."""

    urn: str
    type: str
    name: str
    parent: str  # the parent's URN; "" = the stack itself
    # (name, type, no parent) of each alias spec; "" = the resource's own name or type
    aliases: tuple[tuple[str, str, bool], ...]

    @property
    def program_aliases(self) -> set[tuple[str, bool]]:
        """(name, no parent) of the aliases the program sets (the provider SDK adds type
        aliases of its own, for types it renamed)."""
        return {(name, no_parent) for name, typ, no_parent in self.aliases if not typ}

    @property
    def parent_type(self) -> str:
        """The parent's type token ("" for the stack)."""
        return self.parent.split("::")[2].split("$")[-1] if self.parent else ""

    @property
    def parent_name(self) -> str:
        return self.parent.split("::")[-1] if self.parent else ""


class RecordingMonitor(mocks.MockMonitor):
    def __init__(self, mocks_: pulumi.runtime.Mocks) -> None:
        super().__init__(mocks_)
        self.registrations: dict[str, Registration] = {}
        self.registered_outputs: dict[str, dict] = {}  # URN -> what register_outputs sent

    def RegisterResource(self, request):
        response = super().RegisterResource(request)
        if request.type == "pulumi:pulumi:Stack":
            return response  # the stack itself, not a resource of the program
        aliases = tuple(
            (a.spec.name, a.spec.type, a.spec.noParent)
            for a in request.aliases
            if a.HasField("spec")
        )
        self.registrations[response.urn] = Registration(
            response.urn, request.type, request.name, request.parent, aliases
        )
        return response

    def RegisterResourceOutputs(self, request):
        self.registered_outputs[request.urn] = rpc.deserialize_properties(request.outputs)
        return super().RegisterResourceOutputs(request)

    def of_type(self, typ: str) -> list[Registration]:
        return [r for r in self.registrations.values() if r.type == typ]

    def children(self, component: Registration) -> list[Registration]:
        return [r for r in self.registrations.values() if r.parent == component.urn]


MOCKS = RecordingMocks()
MONITOR = RecordingMonitor(MOCKS)
pulumi.runtime.set_mocks(MOCKS, preview=False, monitor=MONITOR)

import config  # noqa: E402
import program  # noqa: E402
import sizing  # noqa: E402, F401  (re-exported for the tests)

DATASETS_YAML = """\
bigtable: {project: proj, instance: l2cache}
pubsub: {project: proj, missing_ids_topic: l2cache-missing-ids, edits_topic: pcg-edits,
         dead_letter_topic: l2cache-dead-letter}
tasks: {project: proj, location: us-east1, queue: l2cache-compute, compute_url: https://x,
        max_attempts: 7}
datasets:
  minnie:
    segmentation: gs://bucket/seg
    graph: {kind: bigtable, project: proj, instance: pcg, table_id: minnie}
    cache_table_id: l2cache_minnie_v1
    resolution: [8, 8, 40]
    voxel_offset: [0, 0, 0]
    chunk_size: [256, 256, 512]
    spatial_bits: {1: 10, 2: 10, 3: 9}
  pinky:
    segmentation: gs://bucket/pinky
    graph: {kind: bigtable, project: proj, instance: pcg, table_id: pinky}
    cache_table_id: l2cache_pinky_v1
    resolution: [4.0, 4.0, 40.0]
    voxel_offset: [0, 0, 0]
    chunk_size: [256, 256, 512]
    volume_size: [4096, 4096, 1024]
    spatial_bits: {1: 10, 2: 10}
"""
# The archive builder resolves every dataset's geometry (here given in the map; an
# archive test resolves it from a segmentation info): no test reaches gs://.


PCG_EDITS = "projects/pcg-project/topics/pcg-edits"


def stack_config(tmp: Path, datasets_yaml: str = DATASETS_YAML, **overrides) -> config.StackConfig:
    """The test stack; ``overrides`` replace StackConfig fields (validated by the program)."""
    import yaml

    path = tmp / "datasets.yaml"
    path.write_text(datasets_yaml)
    datasets = yaml.safe_load(datasets_yaml)
    base = config.StackConfig(
        project="proj",
        region="us-east1",
        datasets_file=path,
        datasets=datasets,
        bigtable_instance_type="PRODUCTION",
        bigtable_nodes=3,
        bigtable_zone="us-east1-b",
        cache_max_versions=4,
        chunk_size=(256, 256, 512),
        lookup_invokers=["group:cave@example.org"],
        lookup_max_instances=20,
        worker_max_instances=80,
        queue_max_attempts=7,
        queue_min_backoff_s=5,
        queue_max_backoff_s=300,
        queue_max_concurrent=80,
        queue_max_per_second=40.0,
        graph_instances=["projects/proj/instances/pcg"],
        segmentation_buckets=["bucket"],
        pcg_edits_topic=PCG_EDITS,
        cave_auth=config.parse_cave_auth(None, datasets),  # as config.load does
    )
    if "existing_cache_tables" in overrides:
        overrides["existing_cache_tables"] = frozenset(overrides["existing_cache_tables"])
    return dataclasses.replace(base, **overrides)


def settle(res):
    """An Output that resolves once every resource of ``res`` (a program.Deployment, a
    component, or dicts and lists of them) is registered: each component's public
    attributes are walked, and each component exposes every resource it creates."""
    outs, seen = [], []

    def walk(v):
        if isinstance(v, pulumi.Resource):
            if any(v is r for r in seen):
                return
            seen.append(v)
            outs.append(v.urn)
            if isinstance(v, pulumi.ComponentResource):
                walk([x for k, x in vars(v).items() if not k.startswith("_")])
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            walk(list(vars(v).values()))
        elif isinstance(v, dict):
            walk(list(v.values()))
        elif isinstance(v, list | tuple):
            for x in v:
                walk(x)

    walk(res)
    return pulumi.Output.all(*outs)


async def registered_outputs(res, timeout_s: float = 10.0) -> dict[str, dict]:
    """Every component's registered outputs by type token, once all have arrived
    (``register_outputs`` reaches the monitor a moment after its values resolve)."""
    await settle(res).future()
    components = [r for r in MONITOR.registrations.values() if r.type.startswith("l2cache:")]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not all(c.urn in MONITOR.registered_outputs for c in components):
        if loop.time() > deadline:
            missing = [c.type for c in components if c.urn not in MONITOR.registered_outputs]
            raise AssertionError(f"no registered outputs from {missing}")
        await asyncio.sleep(0.01)
    return {c.type: MONITOR.registered_outputs[c.urn] for c in components}


if __name__ == "__main__":
    # a variant config in a fresh process (resource names are per stack, so one build
    # per process): argv[1] = JSON {"datasets_yaml": ..., StackConfig field: value};
    # prints every registered resource as JSON {"type", "name", "inputs", "parent",
    # "aliases"} (parent: "<type token>::<name>", "" for the stack), one per line, then
    # each component's registered outputs as {"type": "registered_outputs", "name": token}.
    import json
    import tempfile

    overrides = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}

    @pulumi.runtime.test
    def run():
        res = program.build(stack_config(Path(tempfile.mkdtemp()), **overrides))
        program.export(res)  # the stack outputs must be declarable for every variant

        def report(args):
            parents = {(r.type, r.name): r for r in MONITOR.registrations.values()}
            for r in MOCKS.resources:
                reg = parents[(r.typ, r.name)]
                parent = f"{reg.parent_type}::{reg.parent_name}" if reg.parent else ""
                row = {
                    "type": r.typ,
                    "name": r.name,
                    "inputs": r.inputs,
                    "parent": parent,
                    "aliases": reg.aliases,
                }
                print(json.dumps(row, default=str, sort_keys=True))
            row = {"type": "output", "name": "url_map_commands", "inputs": args[1]}
            print(json.dumps(row, sort_keys=True))
            for typ, outputs in args[2].items():
                row = {"type": "registered_outputs", "name": typ, "inputs": outputs}
                print(json.dumps(row, default=str, sort_keys=True))

        commands = res.lookup.url_map_commands or ""
        outputs = asyncio.ensure_future(registered_outputs(res))
        return pulumi.Output.all(settle(res), commands, outputs).apply(report)

    run()
