//! `xconnector._native`: the pyo3 binding of `xconnector-core`. It converts types, releases the
//! GIL, catches panics and maps errors; nothing else.

mod args;
mod buffers;
mod call;
mod cli;
mod config;
mod convert;
mod engine;
mod engine_pool;
mod errors;
mod kv_namespace;
mod layer_loader;
mod logging;
mod lookup;
mod paged;
mod peer_events;
mod replay;
mod router;
mod sdk;
mod sdk_plan;
mod startup_check;
mod transfer_plan;
mod v0_batch;
mod v1_worker;
mod vllm_events;
mod vllm_transfer;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use xconnector_core::faults::{self, Fault, FaultPoint};
use xconnector_core::hashing::{self, HashExtras};

use crate::call::{detached, guarded};

/// Sequence hashes (Dynamo-compatible) of every full block of `tokens`.
#[pyfunction]
#[pyo3(signature = (tokens, block_size = 16, *, lora_name = None, cache_salt = None))]
fn sequence_hashes(
    py: Python<'_>,
    tokens: &Bound<'_, PyAny>,
    block_size: usize,
    lora_name: Option<String>,
    cache_salt: Option<String>,
) -> PyResult<Vec<u64>> {
    hash_blocks(py, tokens, block_size, lora_name, cache_salt, hashing::sequence_hashes)
}

/// Local (per-block, unchained) hashes of every full block of `tokens`.
#[pyfunction]
#[pyo3(signature = (tokens, block_size = 16, *, lora_name = None, cache_salt = None))]
fn local_block_hashes(
    py: Python<'_>,
    tokens: &Bound<'_, PyAny>,
    block_size: usize,
    lora_name: Option<String>,
    cache_salt: Option<String>,
) -> PyResult<Vec<u64>> {
    hash_blocks(py, tokens, block_size, lora_name, cache_salt, hashing::local_hashes)
}

fn hash_blocks(
    py: Python<'_>,
    tokens: &Bound<'_, PyAny>,
    block_size: usize,
    lora_name: Option<String>,
    cache_salt: Option<String>,
    hash: fn(&[u32], usize, HashExtras<'_>) -> Vec<u64>,
) -> PyResult<Vec<u64>> {
    let toks = guarded(py, || buffers::tokens(tokens))?;
    if block_size == 0 {
        return Err(errors::invalid_input(py, "block_size must be a positive number of tokens (vLLM uses 16 or 32)"));
    }
    detached(py, || Ok(hash(&toks, block_size, engine::extras(&lora_name, &cache_salt, &None))))
}

/// Test hook: make every later `point` call ("lookup", "store", "load") fail with `fault`
/// ("error", "panic", or "none" to stop). Process-wide.
#[pyfunction]
fn _inject_fault(point: &str, fault: &str) -> PyResult<()> {
    let p = FaultPoint::parse(point).ok_or_else(|| {
        PyValueError::new_err(format!(
            "unknown fault point {point:?}; use lookup, store, load, store_copy or load_copy"
        ))
    })?;
    let f = Fault::parse(fault).ok_or_else(|| {
        PyValueError::new_err(format!("unknown fault {fault:?}; use none, error, panic, garbage or hold"))
    })?;
    faults::inject(p, f);
    Ok(())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    logging::init(m.py());
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("HASH_VERSION", hashing::HASH_VERSION)?;
    m.add_class::<engine::Engine>()?;
    m.add_class::<engine::BlockView>()?;
    m.add_class::<paged::PagedKv>()?;
    m.add_class::<router::Router>()?;
    m.add_class::<router::OverlapIndex>()?;
    m.add_class::<sdk::SdkStats>()?;
    m.add_class::<sdk::PeerOverlap>()?;
    m.add_class::<engine_pool::EnginePool>()?;
    m.add_function(wrap_pyfunction!(engine_pool::merge_expositions, m)?)?;
    m.add_function(wrap_pyfunction!(sdk_plan::sdk_adapters_to_load, m)?)?;
    m.add_class::<peer_events::EventSubscriber>()?;
    m.add_class::<lookup::LookupServer>()?;
    m.add_class::<lookup::LookupClient>()?;
    m.add_class::<vllm_events::VllmBlockNames>()?;
    m.add_class::<vllm_events::VllmRankAgreement>()?;
    m.add_class::<transfer_plan::TransferPlanner>()?;
    m.add_function(wrap_pyfunction!(v0_batch::v0_prefills, m)?)?;
    m.add_function(wrap_pyfunction!(v0_batch::v0_skip, m)?)?;
    m.add_function(wrap_pyfunction!(lookup::lookup_socket_path, m)?)?;
    m.add_function(wrap_pyfunction!(paged::block_ids_from_slots, m)?)?;
    m.add_function(wrap_pyfunction!(paged::detect_kv_layout, m)?)?;
    m.add_function(wrap_pyfunction!(paged::kv_block_dim, m)?)?;
    m.add_class::<paged::EngineBlocks>()?;
    m.add_function(wrap_pyfunction!(kv_namespace::kv_namespace, m)?)?;
    m.add_function(wrap_pyfunction!(kv_namespace::vllm_kv_namespace, m)?)?;
    m.add_function(wrap_pyfunction!(kv_namespace::v0_kv_namespace, m)?)?;
    m.add_function(wrap_pyfunction!(kv_namespace::lora_identity, m)?)?;
    m.add_function(wrap_pyfunction!(kv_namespace::key_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(sequence_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(local_block_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(_inject_fault, m)?)?;
    m.add_function(wrap_pyfunction!(replay::replay, m)?)?;
    m.add_function(wrap_pyfunction!(replay::usable_prefix, m)?)?;
    m.add_function(wrap_pyfunction!(replay::last_level_cache_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(logging::reset_log_cache, m)?)?;
    m.add_function(wrap_pyfunction!(config::config_normalize, m)?)?;
    m.add_function(wrap_pyfunction!(config::config_normalize_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(config::config_resolve_document, m)?)?;
    m.add_function(wrap_pyfunction!(config::config_load_file, m)?)?;
    m.add_function(wrap_pyfunction!(config::config_discover, m)?)?;
    m.add_function(wrap_pyfunction!(config::config_env_vars, m)?)?;
    m.add_function(wrap_pyfunction!(config::config_redact, m)?)?;
    m.add_function(wrap_pyfunction!(config::config_coerce, m)?)?;
    m.add_function(wrap_pyfunction!(config::config_read_document, m)?)?;
    m.add_function(wrap_pyfunction!(vllm_transfer::vllm_transfer_config, m)?)?;
    m.add_function(wrap_pyfunction!(vllm_transfer::warn_on_failing_loads, m)?)?;
    m.add_function(wrap_pyfunction!(config::config_engine_settings, m)?)?;
    m.add_function(wrap_pyfunction!(startup_check::config_worker_patches, m)?)?;
    m.add_function(wrap_pyfunction!(startup_check::config_for_vllm_connector, m)?)?;
    m.add_function(wrap_pyfunction!(cli::cli_main, m)?)?;
    m.add_function(wrap_pyfunction!(v1_worker::fail_open_call, m)?)?;
    m.add_function(wrap_pyfunction!(v0_batch::v0_load, m)?)?;
    m.add_function(wrap_pyfunction!(v0_batch::v0_store, m)?)?;
    m.add_class::<v1_worker::V1Worker>()?;
    Ok(())
}
