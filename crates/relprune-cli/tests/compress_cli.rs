//! `relprune compress` / `decompress` as a user runs them on the Hugging Face fixtures of
//! relprune-models: the round trip gives every input file back byte for byte, compressed
//! checkpoints load and compute what the dense ones do, `prune-hf --format` writes them
//! directly, and a damaged compressed file is a clear error that leaves nothing behind.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use relprune_sparse::file::{self, Raw};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/tests/data")
        .join(name)
}

fn relprune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_relprune"))
        .args(args)
        .output()
        .expect("runs the relprune binary")
}

fn ok(args: &[&str]) -> String {
    let out = relprune(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `relprune compress --model input --format format --out out`, which must succeed.
fn compress(input: &Path, format: &str, out: &Path) {
    ok(&[
        "compress",
        "--model",
        s(input),
        "--format",
        format,
        "--out",
        s(out),
    ]);
}

/// Every file under `dir`, by relative path, with its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// The JSON `relprune forward` writes for the fixture's reference inputs with model `dir`.
fn forward(dir: &Path, inputs: &Path, tmp: &Path, sparse: bool) -> Value {
    let out = tmp.join(format!("forward-{}.json", rand_name()));
    let mut args = vec!["forward", "--model", s(dir), "--input", s(inputs)];
    args.extend(["--out", s(&out)]);
    if sparse {
        args.push("--sparse");
    }
    ok(&args);
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

fn rand_name() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed).to_string()
}

#[test]
fn compress_then_decompress_gives_every_file_back_and_the_compressed_model_computes_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["marian-tiny-pruned90", "bert-tiny", "t5-tiny"] {
        let input = fixture(name);
        let reference: Value =
            serde_json::from_str(&std::fs::read_to_string(input.join("reference.json")).unwrap())
                .unwrap();
        let inputs = tmp.path().join(format!("{name}-inputs.json"));
        std::fs::write(&inputs, reference["inputs"].to_string()).unwrap();
        // The input's outputs, dense and with its pruned layers run sparse.
        let expected = [false, true].map(|sparse| forward(&input, &inputs, tmp.path(), sparse));
        for format in ["sparse-bitmask", "relprune-sparse"] {
            let c = tmp.path().join(format!("{name}-{format}"));
            let d = tmp.path().join(format!("{name}-{format}-back"));
            compress(&input, format, &c);
            ok(&["decompress", "--model", s(&c), "--out", s(&d)]);
            assert!(
                files(&input) == files(&d),
                "{name} {format}: not byte for byte"
            );
            let (dense, packed) = (
                std::fs::metadata(input.join("model.safetensors"))
                    .unwrap()
                    .len(),
                std::fs::metadata(c.join("model.safetensors"))
                    .unwrap()
                    .len(),
            );
            if name == "marian-tiny-pruned90" {
                // 90% of the linear weights are zero; embeddings stay dense.
                assert!(
                    (packed as f64) < 0.6 * dense as f64,
                    "{format}: {packed} of {dense}"
                );
            }
            for (sparse, expected) in [false, true].into_iter().zip(&expected) {
                let same = forward(&c, &inputs, tmp.path(), sparse) == *expected;
                assert!(same, "{name} {format} sparse={sparse}: outputs differ");
            }
        }
    }
}

#[test]
fn a_sparse_bitmask_checkpoint_announces_itself_as_compressed_tensors_does() {
    let tmp = tempfile::tempdir().unwrap();
    let c = tmp.path().join("c");
    let input = fixture("marian-tiny-pruned90");
    compress(&input, "sparse-bitmask", &c);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(c.join("config.json")).unwrap()).unwrap();
    let q = &config["quantization_config"];
    assert_eq!(q["quant_method"], "compressed-tensors");
    let sc = &q["sparsity_config"];
    assert_eq!(sc["format"], "sparse-bitmask");
    assert_eq!(sc["sparsity_structure"], "unstructured");
    assert_eq!(sc["targets"], serde_json::json!(["Linear"]));
    let g = sc["global_sparsity"].as_f64().unwrap();
    assert!(g > 0.3 && g < 0.9, "{g}");
    // Every compressed matrix has its four parts, with the layout compressed-tensors reads.
    let bytes = std::fs::read(c.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names = st.names();
    let prefixes: Vec<&str> = names
        .iter()
        .filter_map(|n| n.strip_suffix(".bitmask"))
        .collect();
    assert!(!prefixes.is_empty());
    for p in prefixes {
        let shape = st.tensor(&format!("{p}.shape")).unwrap();
        assert_eq!(shape.dtype(), safetensors::Dtype::I64);
        let dims: Vec<i64> = shape
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let mask = st.tensor(&format!("{p}.bitmask")).unwrap();
        assert_eq!(mask.dtype(), safetensors::Dtype::U8);
        assert_eq!(
            mask.shape(),
            [dims[0] as usize, (dims[1] as usize).div_ceil(8)]
        );
        assert_eq!(
            st.tensor(&format!("{p}.row_offsets")).unwrap().shape(),
            [dims[0] as usize]
        );
        assert!(!names.contains(&format!("{p}.weight").as_str()));
    }
}

/// The stored tensors and metadata of a safetensors file.
fn stored(path: &Path) -> (BTreeMap<String, Raw>, HashMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let tensors = st
        .tensors()
        .iter()
        .map(|(n, v)| (n.clone(), Raw::of(v)))
        .collect();
    (tensors, header.metadata().clone().unwrap_or_default())
}

#[test]
fn a_damaged_compressed_file_is_an_error_naming_the_tensor_and_the_file_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let input = fixture("marian-tiny-pruned90");
    let bitmask = tmp.path().join("bitmask");
    compress(&input, "sparse-bitmask", &bitmask);
    let relprune_dir = tmp.path().join("relprune");
    compress(&input, "relprune-sparse", &relprune_dir);
    let (tensors, meta) = stored(&bitmask.join("model.safetensors"));
    let prefix = tensors
        .keys()
        .find_map(|n| n.strip_suffix(".bitmask"))
        .unwrap()
        .to_string();
    let i64s = |v: &[i64]| Raw {
        dtype: safetensors::Dtype::I64,
        shape: vec![v.len()],
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    };
    let shape = {
        let d = &tensors[&format!("{prefix}.shape")].data;
        [0, 8].map(|o| i64::from_le_bytes(d[o..o + 8].try_into().unwrap()))
    };
    let rows = shape[0] as usize;
    type Edit = Box<dyn Fn(&mut BTreeMap<String, Raw>, &mut HashMap<String, String>)>;
    let p = prefix.clone();
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "popcount",
            Box::new({
                let p = p.clone();
                move |t, _| {
                    let m = t.get_mut(&format!("{p}.bitmask")).unwrap();
                    let byte = m.data.iter().position(|&b| b != 0xff).unwrap();
                    m.data[byte] |= !m.data[byte] & m.data[byte].wrapping_add(1);
                }
            }),
            "entries but",
        ),
        (
            "row offsets out of range",
            Box::new({
                let p = p.clone();
                move |t, _| {
                    let mut o: Vec<i64> = (0..rows as i64).collect();
                    o[rows - 1] = i64::MAX;
                    t.insert(format!("{p}.row_offsets"), i64s(&o));
                }
            }),
            "row",
        ),
        (
            "row offsets decreasing",
            Box::new({
                let p = p.clone();
                move |t, _| {
                    let mut o = vec![0i64; rows];
                    o[1] = 5;
                    t.insert(format!("{p}.row_offsets"), i64s(&o));
                }
            }),
            "row 1",
        ),
        (
            "shape",
            Box::new({
                let p = p.clone();
                move |t, _| {
                    t.insert(format!("{p}.shape"), i64s(&[shape[0], shape[1] + 16]));
                }
            }),
            "does not fit",
        ),
    ];
    for (what, edit, expect) in cases {
        let dir = tmp
            .path()
            .join(format!("broken-{}", what.replace(' ', "-")));
        copy_dir(&bitmask, &dir);
        let (mut t, mut m) = (tensors.clone(), meta.clone());
        edit(&mut t, &mut m);
        std::fs::write(
            dir.join("model.safetensors"),
            file::serialize(&t, &m).unwrap(),
        )
        .unwrap();
        check_rejected(&dir, tmp.path(), &[&format!("`{prefix}`"), expect], what);
    }
    // An unknown relprune format.
    let dir = tmp.path().join("broken-format");
    copy_dir(&relprune_dir, &dir);
    let (t, mut m) = stored(&relprune_dir.join("model.safetensors"));
    m.insert("format".into(), "relprune-sparse-v9".into());
    std::fs::write(
        dir.join("model.safetensors"),
        file::serialize(&t, &m).unwrap(),
    )
    .unwrap();
    check_rejected(
        &dir,
        tmp.path(),
        &["unknown compressed format `relprune-sparse-v9`"],
        "format",
    );
}

/// `decompress` and `forward` both fail on `dir` with a message naming its weights file and
/// holding `expect`, and `decompress` leaves no output directory.
fn check_rejected(dir: &Path, tmp: &Path, expect: &[&str], what: &str) {
    let out = tmp.join(format!(
        "{}-out",
        dir.file_name().unwrap().to_string_lossy()
    ));
    let reference = std::fs::read_to_string(fixture("marian-tiny-pruned90/reference.json"));
    let reference: Value = serde_json::from_str(&reference.unwrap()).unwrap();
    let inputs = tmp.join("ids.json");
    std::fs::write(&inputs, reference["inputs"].to_string()).unwrap();
    for args in [
        vec!["decompress", "--model", s(dir), "--out", s(&out)],
        vec![
            "forward",
            "--model",
            s(dir),
            "--input",
            s(&inputs),
            "--out",
            s(&out),
        ],
    ] {
        let r = relprune(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{what}: {args:?} succeeded");
        assert!(
            err.contains(&s(&dir.join("model.safetensors")).to_string()),
            "{what}: {err}"
        );
        for e in expect {
            assert!(err.contains(e), "{what}: {err} lacks {e}");
        }
        assert!(!out.exists(), "{what}: {args:?} left {}", out.display());
        let leftovers: Vec<_> = std::fs::read_dir(tmp)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("relprune-tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{what}: {leftovers:?}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for (rel, bytes) in files(from) {
        let p = to.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
}

#[test]
fn compress_refuses_what_it_cannot_do_before_writing_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let input = fixture("marian-tiny-pruned90");
    let c = tmp.path().join("c");
    compress(&input, "sparse-bitmask", &c);
    let out = tmp.path().join("out");
    let nope = tmp.path().join("nope");
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec!["compress", "--model", s(&c), "--format", "sparse-bitmask"],
            "already compressed or quantized",
        ),
        (
            vec!["decompress", "--model", s(&input)],
            "is not compressed",
        ),
        (
            vec![
                "compress",
                "--model",
                s(&nope),
                "--format",
                "relprune-sparse",
            ],
            "no such model directory",
        ),
        (
            vec!["compress", "--model", s(&input), "--format", "zip"],
            "possible values: sparse-bitmask, relprune-sparse",
        ),
    ];
    for (mut args, expect) in cases {
        args.extend(["--out", s(&out)]);
        let r = relprune(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(
            !r.status.success() && err.contains(expect),
            "{args:?}: {err}"
        );
        assert!(!out.exists());
    }
    // An existing output is never replaced.
    let r = relprune(&["decompress", "--model", s(&c), "--out", s(&c)]);
    assert!(String::from_utf8_lossy(&r.stderr).contains("already exists"));
    assert!(c.join("model.safetensors").is_file());
}
