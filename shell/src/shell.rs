//! What every command starts from: the data paths, the adapter host, the adapters found, the catalog and
//! the database.

use crate::adapter::AdapterHost;
use crate::catalog::{Catalog, Source};
use crate::host::Limits;
use crate::paths::Paths;
use crate::registry::Registry;
use anyhow::Result;

pub struct Shell {
    pub paths: Paths,
    pub host: AdapterHost,
    pub registry: Registry,
    pub catalog: Catalog,
    pub db: crate::db::Db,
}

impl Shell {
    pub fn open() -> Result<Shell> {
        let paths = Paths::resolve()?;
        let host = AdapterHost::new(Limits::default(), Some(paths.compiled_adapters()))?;
        let db = crate::db::Db::open(&paths.database())?;
        let registry = Registry::discover(&host, &paths, &db);
        for (path, problem) in registry.refused() {
            tracing::warn!("skipped adapter {}: {problem}", path.display());
        }
        Ok(Shell { paths, host, registry, catalog: Catalog::builtin(), db })
    }

    /// Where a downloaded model lives: `Models/<org>--<name>/` for hub snapshots, `Models/<slug>-<quant>.bundle/`
    /// (holding the one bundle file) for Leap bundles.
    pub fn model_dir(&self, source: &Source) -> std::path::PathBuf {
        match source {
            Source::Hub { repo, .. } => self.paths.models().join(repo.replace('/', "--")),
            Source::Leap { slug, quantization } => self.paths.models().join(format!("{slug}-{quantization}.bundle")),
        }
    }
}
