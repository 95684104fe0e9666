//! The curated model list the shell ships (catalog.json): which adapter serves each model id and where
//! the model comes from. Everything else about a model (names, sizes, badges) is the adapter's to say.

use crate::adapter::bindings::exports::edgechat::adapter::catalog as wit;
use anyhow::{bail, Context, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    pub version: u32,
    pub models: Vec<Entry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub id: String,
    pub adapter: String,
    pub source: Source,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Source {
    Hub { repo: String, revision: String },
    Leap { slug: String, quantization: String },
}

impl Source {
    pub fn to_wit(&self) -> wit::Source {
        match self {
            Source::Hub { repo, revision } => wit::Source::Hub(wit::HubSource { repo: repo.clone(), revision: revision.clone() }),
            Source::Leap { slug, quantization } => {
                wit::Source::Leap(wit::LeapSource { slug: slug.clone(), quantization: quantization.clone() })
            }
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Hub { repo, revision } => write!(f, "hub:{repo}@{revision}"),
            Source::Leap { slug, quantization } => write!(f, "leap:{slug}:{quantization}"),
        }
    }
}

impl Catalog {
    pub fn builtin() -> Self {
        Self::parse(include_str!("../../catalog.json")).expect("catalog.json is checked by the tests")
    }

    pub fn parse(json: &str) -> Result<Self> {
        let catalog: Catalog = serde_json::from_str(json).context("catalog.json is malformed")?;
        if catalog.version != 1 {
            bail!("catalog version {} is not supported", catalog.version);
        }
        let mut ids: Vec<&str> = catalog.models.iter().map(|m| m.id.as_str()).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            bail!("catalog lists {} twice", w[0]);
        }
        Ok(catalog)
    }

    pub fn get(&self, id: &str) -> Option<&Entry> {
        self.models.iter().find(|m| m.id == id)
    }
}

pub fn runtime_label(kind: wit::RuntimeKind) -> &'static str {
    match kind {
        wit::RuntimeKind::MlxSafetensors => "MLX (safetensors)",
        wit::RuntimeKind::MlxGguf => "MLX (GGUF)",
        wit::RuntimeKind::MlxLeapBundle => "MLX (Leap bundle)",
    }
}
