// The graph cache's key of a call (see graph_signature.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace fcl {

// (key, tensor arguments, their bytes less the filled ones) of a call of composition `name`, as
// fairseq_clustered/ops/graph_cache.py's _signature; the key is None where an argument is a tensor
// off the GPU or none is a tensor (such calls run eagerly).
pybind11::tuple graph_signature(const pybind11::str& name, const pybind11::sequence& args,
                                const pybind11::sequence& filled);

}  // namespace fcl
