"""A dataset added to the map is served by a running lookup without a restart."""

from __future__ import annotations

import copy
import json

from test_lookup_main import API, call

from l2cache.handlers import lookup as lookup_handler


def test_a_dataset_added_to_the_map_is_served_without_a_restart(
    load_main, bigtable, fn_map, use_map
):
    use_map(fn_map)
    lookup_handler.reset()
    try:
        main = load_main("lookup")
        assert call(main, f"{API}/table/added/attributes", "POST").status_code == 404
        with_added = copy.deepcopy(fn_map)
        with_added["datasets"]["added"] = copy.deepcopy(fn_map["datasets"]["ds"])
        use_map(with_added)
        mapping = json.loads(call(main, f"{API}/table_mapping").get_data())
        assert sorted(mapping) == ["added", "ds", "theirs"]
    finally:
        lookup_handler.reset()
