//! How a worker's [`Namespace`] is derived from what its serving engine reports: the model and
//! its effective configuration, the KV dtype, the per-block shape, the parallel ranks, and the
//! identity of a LoRA adapter's weights. The binding hands in plain values (strings, ints, tensor
//! shapes, JSON texts); every rule is here, once, for vLLM's v0 adapter and v1 connector alike.
//!
//! Invariant: the results are byte-identical to what the Python adapter computed before these
//! rules moved here, because caches already on disk and in Redis are keyed by them. The golden
//! values in the tests were computed by that Python code; do not change them.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;

use parking_lot::Mutex;

use crate::blake2b::Blake2b128;
use crate::error::{CoreError, Result};
use crate::kv_layout::KvLayout;
use crate::namespace::Namespace;
use crate::pyjson;

/// What a worker reports about its KV caches and model.
#[derive(Clone, Debug, Default)]
pub struct WorkerKv {
    /// The model as the engine names it (a path or hub name).
    pub model: String,
    /// The operator's name for the model (the `model_id` setting): it wins when not empty, so one
    /// model mounted at two paths shares.
    pub model_id: Option<String>,
    pub revision: String,
    pub quantization: String,
    /// The engine's KV cache dtype setting (`auto`, `fp8`, `fp8_e5m2`, ...), if it has one.
    pub cache_dtype: Option<String>,
    /// The KV tensors' element type (`bfloat16`, `uint8`, ...).
    pub tensor_dtype: String,
    /// Each layer's KV tensor shape, number of blocks included.
    pub layer_shapes: Vec<Vec<usize>>,
    /// Tokens per KV block.
    pub block_size: usize,
    /// The layout whose block dimension `block_shape` leaves out; detected from the first layer's
    /// shape when `None`.
    pub layout: Option<KvLayout>,
    pub tp_world_size: u32,
    pub tp_rank: u32,
    pub pp_world_size: u32,
    pub pp_rank: u32,
    /// The model's effective configuration, when the engine exposes one.
    pub model_config: Option<ModelConfig>,
}

/// A model's configuration as top-level `(key, value as JSON text)` entries, plus the context
/// length (which LongRoPE picks its factors from).
#[derive(Clone, Debug, Default)]
pub struct ModelConfig {
    pub entries: Vec<(String, String)>,
    pub max_model_len: Option<i64>,
}

/// The namespace of a worker's blocks: model (or `model_id`), revision, KV dtype, quantization,
/// per-block shape, tensor- and pipeline-parallel size and rank, and the model configuration's
/// fingerprint. Nothing that varies with memory settings (the number of blocks). `kv_layout` and
/// `block_size` are left for the engine to fill from the block mover it uses.
pub fn derive(worker: &WorkerKv) -> Result<Namespace> {
    let mut extra =
        vec![("block_shape".to_owned(), block_shape(&worker.layer_shapes, worker.block_size, worker.layout)?)];
    if let Some(config) = &worker.model_config {
        extra.push(("model_config".to_owned(), model_fingerprint(config)));
    }
    let model = match worker.model_id.as_deref() {
        Some(id) if !id.is_empty() => id.to_owned(),
        _ => worker.model.clone(),
    };
    Ok(Namespace {
        model,
        revision: worker.revision.clone(),
        dtype: kv_dtype(worker.cache_dtype.as_deref(), &worker.tensor_dtype),
        quantization: worker.quantization.clone(),
        kv_layout: String::new(),
        block_size: 0,
        tp_world_size: worker.tp_world_size,
        tp_rank: worker.tp_rank,
        pp_world_size: worker.pp_world_size,
        pp_rank: worker.pp_rank,
        extra,
    })
}

/// The KV dtype: the cache dtype setting when it names one, fp8 variants told apart (both are
/// uint8 tensors; vLLM's plain `fp8` is e4m3), else the tensors' own dtype.
pub fn kv_dtype(cache_dtype: Option<&str>, tensor_dtype: &str) -> String {
    match cache_dtype {
        Some("fp8") => "fp8_e4m3".to_owned(),
        Some(d) if !d.is_empty() && d != "auto" => d.to_owned(),
        _ => tensor_dtype.to_owned(),
    }
}

/// Layers x one block's shape per layer, without the number of blocks: what a block's bytes depend
/// on, so workers whose KV caches have different numbers of blocks (other memory settings, a
/// restart) share entries. `"{layers}x[{distinct per-layer shapes, sorted, joined by ','}]"`, each
/// shape `"AxBxC"`.
pub fn block_shape(layer_shapes: &[Vec<usize>], block_size: usize, layout: Option<KvLayout>) -> Result<String> {
    let first =
        layer_shapes.first().ok_or_else(|| CoreError::invalid("no KV tensors; expected one KV tensor per layer"))?;
    let layout = match layout {
        Some(l) => l,
        None => KvLayout::detect(first, block_size, None)?,
    };
    let dim = layout.block_dim();
    let mut per_layer: Vec<Vec<usize>> = layer_shapes
        .iter()
        .map(|s| s.iter().enumerate().filter(|&(i, _)| i != dim).map(|(_, &d)| d).collect())
        .collect();
    // Sorted as tuples of ints (lexicographically by dimension), duplicates dropped.
    per_layer.sort();
    per_layer.dedup();
    let shapes: Vec<String> =
        per_layer.iter().map(|s| s.iter().map(usize::to_string).collect::<Vec<_>>().join("x")).collect();
    Ok(format!("{}x[{}]", layer_shapes.len(), shapes.join(",")))
}

/// A digest of the model's effective configuration (after overrides: RoPE scaling, sliding
/// windows, ...), plus the context length when RoPE is scaled. Its path (`_name_or_path`) and the
/// transformers version are left out, so one model mounted at two paths still shares.
///
/// The digest is BLAKE2b-128 (hex) of the configuration as Python's `json.dumps(config,
/// sort_keys=True)` writes it; each entry's value arrives already in that form.
pub fn model_fingerprint(config: &ModelConfig) -> String {
    let mut entries: Vec<(&str, String)> = config
        .entries
        .iter()
        .filter(|(k, _)| k != "_name_or_path" && k != "transformers_version")
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let rope_scaled = entries.iter().any(|(k, v)| *k == "rope_scaling" && json_truthy(v));
    if rope_scaled {
        entries.retain(|(k, _)| *k != "max_model_len");
        let len = config.max_model_len.map_or_else(|| "null".to_owned(), |n| n.to_string());
        entries.push(("max_model_len", len));
    }
    // Code point order, as Python sorts str keys (UTF-8 byte order is the same order).
    entries.sort_by(|a, b| a.0.cmp(b.0));
    entries.dedup_by(|later, earlier| later.0 == earlier.0);
    let body: Vec<String> = entries.iter().map(|(k, v)| format!("{}: {v}", pyjson::string(k))).collect();
    let mut h = Blake2b128::new();
    h.update(format!("{{{}}}", body.join(", ")).as_bytes());
    h.hex()
}

/// Python truthiness of a JSON value: `null`, `false`, zero, `""`, `[]` and `{}` are false.
/// Texts that are not strict JSON (`NaN`, `Infinity`) are numbers other than zero: true.
fn json_truthy(text: &str) -> bool {
    use serde_json::Value;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Null) => false,
        Ok(Value::Bool(b)) => b,
        Ok(Value::Number(n)) => n.as_f64() != Some(0.0),
        Ok(Value::String(s)) => !s.is_empty(),
        Ok(Value::Array(a)) => !a.is_empty(),
        Ok(Value::Object(o)) => !o.is_empty(),
        Err(_) => true,
    }
}

/// What a LoRA adapter's KV depends on beyond its name: the content of its files (hashed once per
/// file size and modification time), so an adapter reloaded in place, or another adapter
/// registered under an old name, is never served the old KV, while the same adapter on two
/// servers shares. An adapter that is not a local directory is identified by its path.
///
/// `content:` + BLAKE2b-128 over each regular file of the directory (symlinks followed, sorted by
/// name): its path, then its bytes; `path:` + the path otherwise. Paths are normalized as Python's
/// `pathlib` does.
pub fn lora_identity(path: &str) -> Result<String> {
    let dir = normalize_path(path);
    if !fs::metadata(&dir).is_ok_and(|m| m.is_dir()) {
        return Ok(format!("path:{dir}"));
    }
    let io = |context: String| move |source| CoreError::Io { context, source };
    let mut stamp = Vec::new();
    for entry in fs::read_dir(&dir).map_err(io(format!("listing LoRA adapter {dir}")))? {
        let entry = entry.map_err(io(format!("listing LoRA adapter {dir}")))?;
        let name = entry
            .file_name()
            .into_string()
            .map_err(|n| CoreError::invalid(format!("LoRA adapter file name {n:?} is not UTF-8")))?;
        let file = child_path(&dir, &name);
        let Ok(meta) = fs::metadata(&file) else { continue };
        if meta.is_file() {
            stamp.push((file, meta.size(), meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128));
        }
    }
    stamp.sort();
    Ok(format!("content:{}", files_digest(&stamp)?))
}

type Stamp = Vec<(String, u64, i128)>;

/// Digests by (path, size, mtime) of every file: an adapter's files are read once while they stay
/// unchanged. Bounded: cleared when full.
static DIGESTS: Mutex<Option<HashMap<Stamp, String>>> = Mutex::new(None);
const DIGESTS_MAX: usize = 256;

fn files_digest(stamp: &Stamp) -> Result<String> {
    if let Some(hit) = DIGESTS.lock().as_ref().and_then(|m| m.get(stamp)) {
        return Ok(hit.clone());
    }
    let mut h = Blake2b128::new();
    for (path, _, _) in stamp {
        h.update(path.as_bytes());
        let bytes = fs::read(path).map_err(|source| CoreError::Io { context: format!("reading {path}"), source })?;
        h.update(&bytes);
    }
    let digest = h.hex();
    let mut cache = DIGESTS.lock();
    let map = cache.get_or_insert_with(HashMap::new);
    if map.len() >= DIGESTS_MAX {
        map.clear();
    }
    map.insert(stamp.clone(), digest.clone());
    Ok(digest)
}

/// `str(pathlib.PurePosixPath(path))`: repeated separators and `.` parts dropped, a leading `//`
/// (exactly two) kept, `.` for nothing left.
fn normalize_path(path: &str) -> String {
    let root = if path.starts_with("//") && !path.starts_with("///") {
        "//"
    } else if path.starts_with('/') {
        "/"
    } else {
        ""
    };
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    let out = format!("{root}{}", parts.join("/"));
    if out.is_empty() {
        ".".to_owned()
    } else {
        out
    }
}

/// `str(pathlib.Path(dir) / name)` for a normalized `dir`.
fn child_path(dir: &str, name: &str) -> String {
    match dir {
        "." => name.to_owned(),
        d if d.ends_with('/') => format!("{d}{name}"),
        d => format!("{d}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker() -> WorkerKv {
        WorkerKv {
            model: "meta/llama".into(),
            tensor_dtype: "float16".into(),
            cache_dtype: Some("auto".into()),
            layer_shapes: vec![vec![10, 2, 16, 8]; 3],
            block_size: 16,
            tp_world_size: 1,
            pp_world_size: 1,
            ..WorkerKv::default()
        }
    }

    #[test]
    fn fp8_variants_are_told_apart_in_the_dtype() {
        assert_eq!(kv_dtype(Some("fp8"), "uint8"), "fp8_e4m3");
        assert_eq!(kv_dtype(Some("fp8_e4m3"), "uint8"), "fp8_e4m3");
        assert_eq!(kv_dtype(Some("fp8_e5m2"), "uint8"), "fp8_e5m2");
        // "auto", nothing or an empty setting: the tensors' dtype.
        for setting in [Some("auto"), None, Some("")] {
            assert_eq!(kv_dtype(setting, "bfloat16"), "bfloat16");
        }
    }

    #[test]
    fn block_shape_excludes_the_block_count() {
        let shapes =
            |blocks: usize| vec![vec![2, blocks, 16, 2, 4], vec![2, blocks, 16, 2, 4], vec![2, blocks, 16, 4, 4]];
        assert_eq!(block_shape(&shapes(7), 16, None).unwrap(), "3x[2x16x2x4,2x16x4x4]");
        assert_eq!(block_shape(&shapes(7), 16, None).unwrap(), block_shape(&shapes(900), 16, None).unwrap());
        // The block dimension comes from the layout: dimension 0 except for flash_attn.
        assert_eq!(block_shape(&vec![vec![10, 2, 16, 8]; 3], 16, None).unwrap(), "3x[2x16x8]");
        assert_eq!(block_shape(&[vec![5, 16, 12]], 16, Some(KvLayout::Mla)).unwrap(), "1x[16x12]");
        assert!(block_shape(&[], 16, None).is_err());
    }

    #[test]
    fn model_fingerprint_ignores_path_and_version_and_sees_rope_context() {
        let cfg = |entries: &[(&str, &str)], len| ModelConfig {
            entries: entries.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            max_model_len: len,
        };
        let base = model_fingerprint(&cfg(&[("hidden_size", "64")], Some(4096)));
        let moved = cfg(&[("_name_or_path", "\"/b\""), ("transformers_version", "\"9\""), ("hidden_size", "64")], None);
        assert_eq!(model_fingerprint(&moved), base);
        assert_ne!(model_fingerprint(&cfg(&[("hidden_size", "128")], Some(4096))), base);
        // The context length counts only when RoPE is scaled (an empty rope_scaling is not).
        let rope = |len| model_fingerprint(&cfg(&[("hidden_size", "64"), ("rope_scaling", "{\"factor\": 4.0}")], len));
        assert_ne!(rope(Some(4096)), rope(Some(8192)));
        let unscaled = |len| model_fingerprint(&cfg(&[("hidden_size", "64"), ("rope_scaling", "{}")], len));
        assert_eq!(unscaled(Some(4096)), unscaled(Some(8192)));
        // Entry order does not matter.
        let ab = model_fingerprint(&cfg(&[("a", "1"), ("b", "2")], None));
        assert_eq!(ab, model_fingerprint(&cfg(&[("b", "2"), ("a", "1")], None)));
    }

    #[test]
    fn json_strings_and_truthiness_follow_python() {
        assert_eq!(pyjson::string("q\"\n\t\u{2603}\u{1F600}\u{7f}"), r#""q\"\n\t\u2603\ud83d\ude00\u007f""#);
        for falsy in ["null", "false", "0", "0.0", "\"\"", "[]", "{}"] {
            assert!(!json_truthy(falsy), "{falsy}");
        }
        for truthy in ["true", "1", "-0.5", "\"x\"", "[0]", "{\"a\": null}", "NaN", "Infinity"] {
            assert!(json_truthy(truthy), "{truthy}");
        }
    }

    #[test]
    fn namespaces_match_the_python_adapter() {
        // Golden values computed by the Python adapter before the rules moved to the core.
        let ns = derive(&worker()).unwrap();
        assert_eq!((ns.model.as_str(), ns.dtype.as_str()), ("meta/llama", "float16"));
        assert_eq!(ns.extra, vec![("block_shape".to_owned(), "3x[2x16x8]".to_owned())]);

        let hf1 = vec![
            ("_name_or_path", "\"/x\""),
            ("transformers_version", "\"4.5\""),
            ("hidden_size", "64"),
            ("rope_theta", "1e-05"),
            ("torch_dtype", "\"<class 'numpy.float16'>\""),
            ("name", "\"llam\\u00e4\""),
            ("b", "[1.5, null, true]"),
            ("a", "{\"y\": 2.0, \"z\": 1}"),
        ];
        let config = |entries: &[(&str, &str)], len| {
            Some(ModelConfig {
                entries: entries.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                max_model_len: len,
            })
        };
        let mla = WorkerKv {
            cache_dtype: Some("fp8_e5m2".into()),
            tensor_dtype: "uint8".into(),
            layer_shapes: vec![vec![5, 16, 12]],
            model_config: config(&hf1, Some(4096)),
            ..worker()
        };
        let ns = derive(&mla).unwrap();
        assert_eq!(ns.dtype, "fp8_e5m2");
        assert_eq!(ns.extra[1], ("model_config".to_owned(), "fd196be2ae41573ad5ee48d0d311002e".to_owned()));

        let hf2 = [
            ("hidden_size", "64"),
            ("rope_scaling", "{\"factor\": 4.0, \"type\": \"longrope\"}"),
            ("max_position_embeddings", "131072"),
            ("x", "Infinity"),
        ];
        let rope = WorkerKv { model_config: config(&hf2, Some(8192)), ..worker() };
        assert_eq!(derive(&rope).unwrap().extra[1].1, "38d3a7bc34a1fa8489520655a1a119fa");

        let hf3 = [("hidden_size", "64"), ("rope_scaling", "{}"), ("k", r#""q\"\n\t\u2603\ud83d\ude00""#)];
        let rope_empty = WorkerKv { model_config: config(&hf3, Some(4096)), ..worker() };
        assert_eq!(derive(&rope_empty).unwrap().extra[1].1, "ce0dda78c03a68a59d78babdd0997ba7");

        let tp = WorkerKv {
            model_id: Some("my-model".into()),
            cache_dtype: Some("fp8".into()),
            layer_shapes: vec![vec![2, 7, 16, 2, 4], vec![2, 7, 16, 2, 4], vec![2, 7, 16, 4, 4]],
            tp_world_size: 2,
            tp_rank: 1,
            pp_world_size: 2,
            pp_rank: 1,
            ..worker()
        };
        let ns = derive(&tp).unwrap();
        assert_eq!((ns.model.as_str(), ns.dtype.as_str()), ("my-model", "fp8_e4m3"));
        assert_eq!(ns.extra[0].1, "3x[2x16x2x4,2x16x4x4]");
        assert_eq!(derive(&WorkerKv { model_id: Some(String::new()), ..worker() }).unwrap().model, "meta/llama");
    }

    #[test]
    fn lora_identity_is_its_files_content() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_str().unwrap().to_owned();
        let adapter = format!("{root}/a");
        fs::create_dir(&adapter).unwrap();
        fs::write(format!("{adapter}/adapter_model.bin"), b"weights-1").unwrap();
        fs::write(format!("{adapter}/adapter_config.json"), b"{}").unwrap();
        fs::create_dir(format!("{adapter}/sub")).unwrap(); // directories inside do not count
        let first = lora_identity(&adapter).unwrap();
        assert!(first.starts_with("content:"), "{first}");
        // The same adapter under another spelling of its path: the same identity.
        assert_eq!(lora_identity(&format!("{adapter}/")).unwrap(), first);
        // A weight file rewritten in place (another size): another identity.
        fs::write(format!("{adapter}/adapter_model.bin"), b"weights-22").unwrap();
        assert_ne!(lora_identity(&adapter).unwrap(), first);
        // Not a local directory: its normalized path.
        assert_eq!(lora_identity("hub//org/./lora").unwrap(), "path:hub/org/lora");
        // The digest: each file's path then its bytes, files sorted by name.
        let mut h = Blake2b128::new();
        for (name, bytes) in [("adapter_config.json", &b"{}"[..]), ("adapter_model.bin", b"weights-22")] {
            h.update(format!("{adapter}/{name}").as_bytes());
            h.update(bytes);
        }
        assert_eq!(lora_identity(&adapter).unwrap(), format!("content:{}", h.hex()));
    }

    #[test]
    fn paths_normalize_like_pathlib() {
        for (raw, norm) in [("", "."), ("//a/./b//", "//a/b"), ("///a", "/a"), ("./x/", "x"), ("a/../b", "a/../b")] {
            assert_eq!(normalize_path(raw), norm, "{raw:?}");
        }
        assert_eq!(child_path(".", "f"), "f");
        assert_eq!(child_path("/", "f"), "/f");
        assert_eq!(child_path("a/b", "f"), "a/b/f");
    }
}
