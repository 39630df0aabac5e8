//! The namespace half of a store key: exactly what determines the bytes of a block besides its
//! tokens. Two models (or dtypes, layouts, ranks) sharing a store never serve each other's KV, and
//! nothing else is in it: the number of blocks a worker's KV cache has, for one, is not, so workers
//! with different memory settings (and a restart with another setting) share disk and Redis.

use xxhash_rust::xxh3::Xxh3;

use crate::hashing::{HashExtras, HASH_VERSION};

/// What the KV bytes of a block depend on besides the tokens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespace {
    /// The model as given (a path or hub name), or the operator's override for a model mounted at
    /// different paths.
    pub model: String,
    /// The model's revision (commit, tag), empty when not known.
    pub revision: String,
    /// The KV cache dtype, with fp8 variants told apart (`fp8_e4m3`, `fp8_e5m2`).
    pub dtype: String,
    /// The weights' quantization method (empty: none); it changes the KV the model computes.
    pub quantization: String,
    /// Per-block layout: the layout name and a block's shape per layer, without the block count.
    pub kv_layout: String,
    pub block_size: u32,
    pub tp_world_size: u32,
    pub tp_rank: u32,
    pub pp_world_size: u32,
    pub pp_rank: u32,
    /// Deployment-specific keys that must also separate entries, sorted on use.
    pub extra: Vec<(String, String)>,
}

impl Namespace {
    /// Deterministic 64-bit id of this namespace (the same in every process and on every machine).
    pub fn id(&self) -> u64 {
        self.id_with(HashExtras::default())
    }

    /// The id for a request carrying a LoRA adapter or cache salt: these change the KV too.
    pub fn id_with(&self, extras: HashExtras<'_>) -> u64 {
        let mut h = Xxh3::new();
        // Length-prefixed fields: ("ab","c") and ("a","bc") must not collide.
        let mut field = |bytes: &[u8]| {
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(b"xconnector-namespace");
        field(&HASH_VERSION.to_le_bytes());
        field(self.model.as_bytes());
        field(self.revision.as_bytes());
        field(self.dtype.as_bytes());
        field(self.quantization.as_bytes());
        field(self.kv_layout.as_bytes());
        field(&self.block_size.to_le_bytes());
        field(&self.tp_world_size.to_le_bytes());
        field(&self.tp_rank.to_le_bytes());
        // 0 and 1 both mean "no pipeline parallelism".
        field(&self.pp_world_size.max(1).to_le_bytes());
        field(&self.pp_rank.to_le_bytes());
        let mut extra: Vec<_> = self.extra.iter().collect();
        extra.sort();
        for (k, v) in extra {
            field(k.as_bytes());
            field(v.as_bytes());
        }
        // Empty strings count as absent, matching the block seed.
        field(extras.lora_name.unwrap_or("").as_bytes());
        field(extras.cache_salt.unwrap_or("").as_bytes());
        field(extras.lora_id.unwrap_or("").as_bytes());
        h.digest()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Namespace {
        Namespace {
            model: "llama".into(),
            dtype: "bfloat16".into(),
            kv_layout: "NHD".into(),
            block_size: 16,
            tp_world_size: 2,
            tp_rank: 0,
            pp_world_size: 1,
            ..Namespace::default()
        }
    }

    #[test]
    fn every_field_separates() {
        let b = base();
        let variants = [
            Namespace { model: "llama2".into(), ..base() },
            Namespace { dtype: "float16".into(), ..base() },
            Namespace { kv_layout: "HND".into(), ..base() },
            Namespace { block_size: 32, ..base() },
            Namespace { tp_world_size: 4, ..base() },
            Namespace { tp_rank: 1, ..base() },
            Namespace { revision: "main".into(), ..base() },
            Namespace { quantization: "awq".into(), ..base() },
            Namespace { pp_world_size: 2, ..base() },
            Namespace { pp_rank: 1, ..base() },
            Namespace { dtype: "fp8_e5m2".into(), ..Namespace { dtype: "fp8_e4m3".into(), ..base() } },
            Namespace { extra: vec![("k".into(), "v".into())], ..base() },
        ];
        for v in &variants {
            assert_ne!(v.id(), b.id(), "{v:?}");
        }
        let lora = HashExtras { lora_name: Some("a"), ..Default::default() };
        let salt = HashExtras { cache_salt: Some("a"), ..Default::default() };
        let other_weights = HashExtras { lora_id: Some("/adapters/a-v2"), ..lora };
        assert_ne!(b.id_with(lora), b.id());
        assert_ne!(b.id_with(lora), b.id_with(salt));
        assert_ne!(b.id_with(lora), b.id_with(other_weights));
        let empty = HashExtras { lora_name: Some(""), cache_salt: Some(""), lora_id: Some("") };
        assert_eq!(b.id_with(empty), b.id());
        // No pipeline parallelism reads the same whichever way it is said.
        assert_eq!(Namespace { pp_world_size: 0, ..base() }.id(), base().id());
    }

    #[test]
    fn field_boundaries_matter_and_extra_order_does_not() {
        let a = Namespace { model: "ab".into(), dtype: "c".into(), ..base() };
        let b = Namespace { model: "a".into(), dtype: "bc".into(), ..base() };
        assert_ne!(a.id(), b.id());
        let x = Namespace { extra: vec![("a".into(), "1".into()), ("b".into(), "2".into())], ..base() };
        let y = Namespace { extra: vec![("b".into(), "2".into()), ("a".into(), "1".into())], ..base() };
        assert_eq!(x.id(), y.id());
    }

    #[test]
    fn id_is_a_fixed_function_of_its_fields() {
        // Golden values: processes and machines sharing a store must agree on them. A change here
        // silently turns every shared cache into misses, so make it deliberately (bump HASH_VERSION).
        assert_eq!(base().id(), 0xca7c7941b0d1a363);
        assert_eq!(Namespace::default().id(), 0x19e4d16658da96c8);
    }
}
