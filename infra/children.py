"""Resource options for what a component creates: parented to it, aliased to where it was.

Until the program was grouped into components, every resource was a child of the stack
itself, so its URN carried no parent type. Parenting it to a component changes its URN,
and without an alias ``pulumi up`` on an existing stack would delete the old resource and
create a new one: a cache table's data, a function's URL, a topic's subscriptions. Each
child therefore names the URN it had at the stack root (its own name, or an older one).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pulumi

COMPONENT_TYPE = "l2cache:index:{}"  # type token of every l2cache component


def child_opts(
    parent: pulumi.Resource,
    depends_on: Sequence[pulumi.Resource] | None = None,
    was: Iterable[str] = (),
) -> pulumi.ResourceOptions:
    """Options for a resource ``parent`` creates.

    ``was``: older logical names it had at the stack root, besides its current one (a
    resource renamed before, e.g. a cache table once keyed by dataset name).
    """
    root = pulumi.ROOT_STACK_RESOURCE  # "had no parent": the stack itself
    aliases = [pulumi.Alias(parent=root)]
    aliases += [pulumi.Alias(name=name, parent=root) for name in was]
    return pulumi.ResourceOptions(parent=parent, depends_on=list(depends_on or []), aliases=aliases)
