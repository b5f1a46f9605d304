"""The arguments ``_parallel_linear`` gives megatron-core's tensor-parallel linears bind to the
installed megatron-core's constructors (``parallel_linear_keywords``, docs/DESIGN.md, "GPU fast
paths"). The torch classes are checked as imported; the TE classes cannot be (without Transformer
Engine megatron-core defines them on a mock base), so their ``__init__`` is read from the installed
megatron-core's source: a keyword that is missing or renamed would otherwise surface only on a GPU."""

import ast
import importlib.util
import inspect
from importlib.metadata import version

import pytest

from megatron_cosmos3.parallel.tensor_parallel import _megatron_layers, parallel_linear_keywords

KINDS = ("column", "row")


def signature_from_source(module: str, class_name: str) -> inspect.Signature:
    """The signature of ``class_name.__init__`` as written in ``module``'s source (annotations left
    out, defaults kept), without importing the module."""
    tree = ast.parse(open(importlib.util.find_spec(module).origin).read())
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name)
    init = next(node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == "__init__")
    arguments = init.args
    for argument in arguments.posonlyargs + arguments.args + arguments.kwonlyargs:
        argument.annotation = None
    header = ast.FunctionDef(name="init", args=arguments, body=[ast.Pass()], decorator_list=[], returns=None)
    namespace: dict = {}
    exec(compile(ast.fix_missing_locations(ast.Module(body=[header], type_ignores=[])), module, "exec"), namespace)
    return inspect.signature(namespace["init"])


def bind(signature: inspect.Signature, kind: str, linear_impl: str) -> inspect.BoundArguments:
    """The call ``_parallel_linear`` makes, bound to ``signature`` (TypeError where it does not fit)."""
    keywords = parallel_linear_keywords(kind, linear_impl)
    return signature.bind(None, 32, 64, config=None, init_method=None, tp_group=None, **keywords)


def test_the_installed_megatron_core_is_the_pinned_one():
    assert version("megatron-core").startswith("0.16.")


@pytest.mark.parametrize("kind", KINDS)
def test_megatron_te_linears_take_the_arguments_given(kind):
    """``skip_bias_add`` and ``is_expert`` have no defaults in TE's classes: left out, TE's column
    linear raised a TypeError on the first GPU run under tensor parallelism."""
    class_name = {"column": "TEColumnParallelLinear", "row": "TERowParallelLinear"}[kind]
    signature = signature_from_source("megatron.core.extensions.transformer_engine", class_name)
    bound = bind(signature, kind, "te")
    required = {name for name, p in signature.parameters.items() if p.default is inspect.Parameter.empty}
    assert required <= set(bound.arguments)
    # Control: the same call without a required keyword does not bind.
    without = dict(parallel_linear_keywords(kind, "te"))
    del without["skip_bias_add"]
    with pytest.raises(TypeError, match="skip_bias_add"):
        signature.bind(None, 32, 64, config=None, init_method=None, tp_group=None, **without)


@pytest.mark.parametrize("kind", KINDS)
def test_megatron_torch_linears_take_the_arguments_given(kind):
    _, column, row, _ = _megatron_layers()
    bind(inspect.signature({"column": column, "row": row}[kind].__init__), kind, "torch")
