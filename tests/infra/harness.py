"""Run the Pulumi program under pulumi.runtime mocks and record every resource.

Imported by the infra tests (and run as a script for the variant-config test): sets the
mocks before importing the program, as Pulumi's unit-testing guide requires.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pulumi

INFRA = Path(__file__).resolve().parents[2] / "infra"
sys.path.insert(0, str(INFRA))


class RecordingMocks(pulumi.runtime.Mocks):
    def __init__(self) -> None:
        self.resources: list[pulumi.runtime.MockResourceArgs] = []

    def new_resource(self, args):
        outputs = dict(args.inputs)
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


MOCKS = RecordingMocks()
pulumi.runtime.set_mocks(MOCKS, preview=False)

import config  # noqa: E402
import program  # noqa: E402

DATASETS_YAML = """\
bigtable: {project: proj, instance: l2cache}
pubsub: {project: proj, missing_ids_topic: l2cache-missing-ids, edits_topic: pcg-edits,
         dead_letter_topic: l2cache-dead-letter}
tasks: {project: proj, location: us-east1, queue: l2cache-compute, compute_url: https://x}
datasets:
  minnie:
    segmentation: gs://bucket/seg
    graph: {kind: bigtable, project: proj, instance: pcg, table_id: minnie}
    cache_table_id: l2cache_minnie_v1
  pinky:
    segmentation: gs://bucket/pinky
    graph: {kind: bigtable, project: proj, instance: pcg, table_id: pinky}
    cache_table_id: l2cache_pinky_v1
"""


def stack_config(tmp: Path, lookup_invokers=("group:cave@example.org",)) -> config.StackConfig:
    import yaml

    path = tmp / "datasets.yaml"
    path.write_text(DATASETS_YAML)
    return config.StackConfig(
        project="proj",
        region="us-east1",
        datasets_file=path,
        datasets=yaml.safe_load(DATASETS_YAML),
        bigtable_instance_type="PRODUCTION",
        bigtable_nodes=3,
        bigtable_zone="us-east1-b",
        cache_max_versions=4,
        chunk_size=(256, 256, 512),
        lookup_invokers=list(lookup_invokers),
        lookup_max_instances=20,
        worker_max_instances=80,
        queue_max_attempts=7,
        queue_min_backoff_s=5,
        queue_max_backoff_s=300,
        queue_max_concurrent=150,
        queue_max_per_second=40.0,
        graph_instances=["projects/proj/instances/pcg"],
        segmentation_buckets=["bucket"],
    )


def settle(res: dict):
    """An Output that resolves once every resource of ``res`` is registered."""
    outs = []

    def walk(v):
        if isinstance(v, pulumi.Resource):
            outs.append(v.urn)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(res)
    return pulumi.Output.all(*outs)


if __name__ == "__main__":  # variant config: print the lookup invokers as JSON
    import json
    import tempfile

    invokers = sys.argv[1:]

    @pulumi.runtime.test
    def run():
        res = program.build(stack_config(Path(tempfile.mkdtemp()), invokers))

        def report(_):
            members = sorted(
                r.inputs["member"]
                for r in MOCKS.resources
                if r.typ == "gcp:cloudrunv2/serviceIamMember:ServiceIamMember"
                and r.name.startswith("invoke-lookup")
            )
            print(json.dumps(members))

        return settle(res).apply(report)

    run()
