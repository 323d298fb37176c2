//! Where a checkpoint comes from: a local directory, or a Hugging Face Hub id through the HF
//! cache; and which of its files go to the output unchanged.

use std::path::{Path, PathBuf};

use crate::error::{invalid, Result};

/// Weight files of other frameworks: stale dense copies of the model, never copied to the output.
pub const OTHER_WEIGHT_FILES: &[&str] = &[
    "pytorch_model.bin",
    "tf_model.h5",
    "flax_model.msgpack",
    "rust_model.ot",
    "model.onnx",
];

/// Directories of other runtimes' exports (dense weights), never copied to the output.
pub const OTHER_WEIGHT_DIRS: &[&str] = &["onnx", "openvino"];

/// `p` made absolute (without resolving links), so a resumed run finds its files from anywhere.
pub fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|e| invalid(format!("bad path {}: {e}", p.display())))
}

/// The local directory of a model: an existing directory, else a Hub id (`owner/name`) resolved
/// through the HF cache (`HF_HOME`; with `HF_HUB_OFFLINE=1` nothing is downloaded), at `revision`
/// (default `main`). Other frameworks' weight files are not downloaded.
pub fn resolve(model: &str, revision: Option<&str>) -> Result<PathBuf> {
    let p = Path::new(model);
    if p.is_dir() {
        return absolute(p);
    }
    if p.exists() {
        return Err(invalid(format!("--model {model}: not a directory")));
    }
    let looks_like_id = !model.starts_with(['.', '/', '~'])
        && model.split('/').count() <= 2
        && !model.is_empty()
        && !model.ends_with('/');
    if !looks_like_id {
        return Err(invalid(format!("model directory {model} does not exist")));
    }
    use hf_hub::{Repo, RepoType};
    let repo = Repo::with_revision(
        model.to_string(),
        RepoType::Model,
        revision.unwrap_or("main").to_string(),
    );
    let offline = std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false);
    let config = if offline {
        hf_hub::Cache::from_env()
            .repo(repo)
            .get("config.json")
            .ok_or_else(|| {
                invalid(format!(
                    "{model} is neither a local directory nor in the Hugging Face cache \
                     (HF_HUB_OFFLINE is set, so nothing is downloaded)"
                ))
            })?
    } else {
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .build()
            .map_err(|e| invalid(format!("cannot set up the Hugging Face Hub client: {e}")))?;
        let r = api.repo(repo);
        let info = r.info().map_err(|e| {
            invalid(format!(
                "{model}: not a local directory, and not found on the Hub ({e})"
            ))
        })?;
        for s in &info.siblings {
            let name = s.rfilename.as_str();
            let skip = OTHER_WEIGHT_FILES.iter().any(|f| name.ends_with(f))
                || OTHER_WEIGHT_DIRS
                    .iter()
                    .any(|d| name.starts_with(&format!("{d}/")));
            if !skip {
                r.get(name)
                    .map_err(|e| invalid(format!("cannot download {name} of {model}: {e}")))?;
            }
        }
        r.get("config.json")
            .map_err(|e| invalid(format!("cannot download config.json of {model}: {e}")))?
    };
    Ok(config
        .parent()
        .ok_or_else(|| invalid("the cached config.json has no directory"))?
        .to_path_buf())
}

/// Copies every file of `src` into `dst` (recursively) except the weights file `weights`, hidden
/// files, and other frameworks' dense weight files; returns the names skipped.
pub fn copy_model_files(src: &Path, dst: &Path, weights: &str) -> Result<Vec<String>> {
    let mut skipped = Vec::new();
    copy_dir(src, dst, src, weights, &mut skipped)?;
    Ok(skipped)
}

fn copy_dir(
    root: &Path,
    dst: &Path,
    dir: &Path,
    weights: &str,
    skipped: &mut Vec<String>,
) -> Result<()> {
    let io =
        |what: &str, p: &Path, e: std::io::Error| invalid(format!("{what} {}: {e}", p.display()));
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| io("cannot list", dir, e))?
        .collect::<std::io::Result<_>>()
        .map_err(|e| io("cannot list", dir, e))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
        let rel_s = rel.to_string_lossy().to_string();
        let name = e.file_name().to_string_lossy().to_string();
        // Follows links: the HF cache's snapshot directories are links into its blob store.
        let meta = std::fs::metadata(&path).map_err(|e| io("cannot read", &path, e))?;
        if meta.is_dir() {
            if dir == root && (OTHER_WEIGHT_DIRS.contains(&name.as_str()) || name.starts_with('.'))
            {
                skipped.push(rel_s + "/");
                continue;
            }
            let sub = dst.join(&rel);
            std::fs::create_dir_all(&sub).map_err(|e| io("cannot create", &sub, e))?;
            copy_dir(root, dst, &path, weights, skipped)?;
        } else if dir == root && (name == weights || name.starts_with('.')) {
            continue;
        } else if OTHER_WEIGHT_FILES.contains(&name.as_str())
            || name.starts_with("pytorch_model-")
            || name.ends_with(".gguf")
            || (dir == root && name.starts_with("model.") && name.ends_with(".safetensors"))
        {
            skipped.push(rel_s);
        } else {
            std::fs::copy(&path, dst.join(&rel)).map_err(|e| io("cannot copy", &path, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_and_paths_are_told_apart() {
        let e = resolve("./no/such/dir", None).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
    }
}
