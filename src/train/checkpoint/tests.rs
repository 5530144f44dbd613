use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::manager::parse_checkpoint_name;
use super::*;

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn write_atomic_replaces_and_leaves_no_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.json");
    write_atomic(&p, b"one").unwrap();
    write_atomic(&p, b"two").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"two");
    assert_eq!(names(dir.path()), vec!["a.json"]);
}

#[test]
fn write_atomic_error_names_path_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir").join("a.json");
    let err = write_atomic(&missing, b"x").unwrap_err();
    assert!(format!("{err}").contains("no-such-dir"), "{err}");
    // The target is an existing directory: the rename fails, the temp file is removed.
    let sub = dir.path().join("sub");
    fs::create_dir(&sub).unwrap();
    fs::write(sub.join("keep"), b"k").unwrap();
    assert!(write_atomic(&sub, b"x").is_err());
    assert_eq!(names(dir.path()), vec!["sub"]);
    assert!(write_atomic(Path::new("/"), b"x").is_err());
}

fn write_file(dir: &Path, name: &str, content: &str) -> Result<()> {
    fs::write(dir.join(name), content).map_err(|e| Error::io(dir.join(name), e))
}

#[test]
fn failing_fill_leaves_no_checkpoint_and_no_temp_dir() {
    let dir = tempfile::tempdir().unwrap();
    let mgr = CheckpointManager::new(dir.path(), Some(2));
    let err = mgr
        .save(7, |tmp| {
            write_file(tmp, "half.bin", "partial")?;
            Err(Error::Model("boom".into()))
        })
        .unwrap_err();
    assert!(matches!(err, Error::Model(_)));
    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    assert!(mgr.list().unwrap().is_empty());

    // A panic inside fill cleans up too.
    let mgr2 = mgr.clone();
    let r = std::panic::catch_unwind(move || {
        let _ = mgr2.save(8, |tmp| {
            write_file(tmp, "x", "y").unwrap();
            panic!("fill panicked")
        });
    });
    assert!(r.is_err());
    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
}

#[test]
fn save_writes_whole_dir_and_replaces_same_step() {
    let dir = tempfile::tempdir().unwrap();
    let mgr = CheckpointManager::new(&dir.path().join("run"), None);
    let p = mgr
        .save(3, |tmp| {
            fs::create_dir(tmp.join("nested")).unwrap();
            write_file(&tmp.join("nested"), "b.txt", "b")?;
            write_file(tmp, "a.txt", "first")
        })
        .unwrap();
    assert_eq!(p, dir.path().join("run").join("checkpoint-3"));
    assert_eq!(fs::read_to_string(p.join("nested/b.txt")).unwrap(), "b");
    let p2 = mgr
        .save(3, |tmp| write_file(tmp, "a.txt", "second"))
        .unwrap();
    assert_eq!(p, p2);
    assert_eq!(fs::read_to_string(p.join("a.txt")).unwrap(), "second");
    assert!(!p.join("nested").exists());
    assert_eq!(names(&dir.path().join("run")), vec!["checkpoint-3"]);
}

#[test]
fn keep_last_prunes_numerically_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Unrelated entries and temp dirs are ignored by list and never pruned.
    fs::create_dir(root.join(".tmp-checkpoint-1-999")).unwrap();
    fs::create_dir(root.join("checkpoint-abc")).unwrap();
    fs::create_dir(root.join("checkpoint-007")).unwrap();
    fs::write(root.join("checkpoint-9"), b"a file, not a dir").unwrap();
    fs::write(root.join("metrics.jsonl"), b"").unwrap();

    let mgr = CheckpointManager::new(root, Some(2));
    for step in [5u64, 10, 100] {
        mgr.save(step, |tmp| write_file(tmp, "step", &step.to_string()))
            .unwrap();
    }
    let steps: Vec<u64> = mgr.list().unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![10, 100]);
    assert_eq!(mgr.latest().unwrap(), Some(root.join("checkpoint-100")));
    assert_eq!(
        names(root),
        vec![
            ".tmp-checkpoint-1-999",
            "checkpoint-007",
            "checkpoint-10",
            "checkpoint-100",
            "checkpoint-9",
            "checkpoint-abc",
            "metrics.jsonl"
        ]
    );

    // Saving an older step keeps it (just written) and drops the oldest others.
    mgr.save(50, |tmp| write_file(tmp, "step", "50")).unwrap();
    let steps: Vec<u64> = mgr.list().unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![50, 100]);
    // Some(0) still keeps the one just written.
    let mgr0 = CheckpointManager::new(root, Some(0));
    mgr0.save(200, |tmp| write_file(tmp, "step", "200"))
        .unwrap();
    let steps: Vec<u64> = mgr0.list().unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![200]);
}

#[test]
fn keep_all_when_none() {
    let dir = tempfile::tempdir().unwrap();
    let mgr = CheckpointManager::new(dir.path(), None);
    for step in [100u64, 5, 10] {
        mgr.save(step, |_| Ok(())).unwrap();
    }
    let steps: Vec<u64> = mgr.list().unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![5, 10, 100]);
}

#[test]
fn latest_and_resolve_resume() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("out");
    let mgr = CheckpointManager::new(&root, None);
    assert_eq!(mgr.latest().unwrap(), None); // root does not exist yet
    let err = resolve_resume(&root, "latest").unwrap_err();
    assert!(
        format!("{err}").contains(&root.display().to_string()),
        "{err}"
    );

    for step in [5u64, 100, 10] {
        mgr.save(step, |_| Ok(())).unwrap();
    }
    assert_eq!(mgr.latest().unwrap(), Some(root.join("checkpoint-100")));
    assert_eq!(
        resolve_resume(&root, "latest").unwrap(),
        root.join("checkpoint-100")
    );
    let c10 = root.join("checkpoint-10");
    assert_eq!(resolve_resume(&root, c10.to_str().unwrap()).unwrap(), c10);
    assert_eq!(resolve_resume(&root, "checkpoint-10").unwrap(), c10);

    let missing = root.join("checkpoint-11");
    let err = resolve_resume(&root, missing.to_str().unwrap()).unwrap_err();
    assert!(format!("{err}").contains("checkpoint-11"), "{err}");
    assert!(resolve_resume(&root, "").is_err());
}

#[test]
fn safetensors_round_trip_with_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("adapter_model.safetensors");
    let dev = Device::Cpu;
    let a = Tensor::arange(0f32, 6., &dev)
        .unwrap()
        .reshape((2, 3))
        .unwrap();
    let mut tensors = HashMap::new();
    tensors.insert("a".to_string(), a.clone());
    // Non-contiguous input is saved in logical order.
    tensors.insert("a_t".to_string(), a.t().unwrap());
    tensors.insert("h".to_string(), a.to_dtype(DType::F16).unwrap());
    tensors.insert("b".to_string(), a.to_dtype(DType::BF16).unwrap());
    tensors.insert("d".to_string(), a.to_dtype(DType::F64).unwrap());
    tensors.insert("u".to_string(), a.to_dtype(DType::U32).unwrap());
    tensors.insert("i".to_string(), a.to_dtype(DType::I64).unwrap());
    tensors.insert("c".to_string(), a.to_dtype(DType::U8).unwrap());
    tensors.insert("s".to_string(), Tensor::new(3.5f32, &dev).unwrap());
    tensors.insert(
        "e".to_string(),
        Tensor::zeros((0, 4), DType::F32, &dev).unwrap(),
    );
    let mut meta = HashMap::new();
    meta.insert("step".to_string(), "42".to_string());
    meta.insert("format".to_string(), "not-pt".to_string());
    save_safetensors(&p, &tensors, &meta).unwrap();
    assert_eq!(names(dir.path()), vec!["adapter_model.safetensors"]);

    // Header read back with the safetensors crate itself.
    let bytes = fs::read(&p).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let m = header.metadata().as_ref().unwrap();
    assert_eq!(m.get("format").map(String::as_str), Some("pt"));
    assert_eq!(m.get("step").map(String::as_str), Some("42"));
    assert_eq!(read_safetensors_metadata(&p).unwrap(), m.clone());

    let loaded = load_safetensors(&p, &dev).unwrap();
    assert_eq!(loaded.len(), tensors.len());
    for (name, t) in &tensors {
        let l = &loaded[name];
        assert_eq!(l.dtype(), t.dtype(), "{name}");
        assert_eq!(l.dims(), t.dims(), "{name}");
        let want: Vec<f64> = t
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got: Vec<f64> = l
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn safetensors_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.safetensors");
    fs::write(&p, b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage").unwrap();
    let err = load_safetensors(&p, &Device::Cpu).unwrap_err();
    assert!(format!("{err}").contains("broken.safetensors"), "{err}");
    let err = load_safetensors(&dir.path().join("missing.safetensors"), &Device::Cpu).unwrap_err();
    assert!(format!("{err}").contains("missing.safetensors"), "{err}");

    let mut bad = HashMap::new();
    bad.insert(
        "__metadata__".to_string(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    );
    let out = dir.path().join("out.safetensors");
    assert!(save_safetensors(&out, &bad, &HashMap::new()).is_err());
    assert!(!out.exists());
}

#[test]
fn checkpoint_names_are_canonical() {
    assert_eq!(parse_checkpoint_name("checkpoint-0"), Some(0));
    assert_eq!(parse_checkpoint_name("checkpoint-100"), Some(100));
    assert_eq!(parse_checkpoint_name("checkpoint-007"), None);
    assert_eq!(parse_checkpoint_name("checkpoint-"), None);
    assert_eq!(parse_checkpoint_name("checkpoint-+5"), None);
    assert_eq!(parse_checkpoint_name("checkpoint-5.tmp"), None);
    assert_eq!(parse_checkpoint_name(".tmp-checkpoint-5-1"), None);
    assert_eq!(
        parse_checkpoint_name("checkpoint-99999999999999999999999"),
        None
    );
}

#[test]
fn weight_files_with_integer_tensors_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("adapter_model.safetensors");
    let dev = Device::Cpu;
    let mut tensors = HashMap::new();
    tensors.insert(
        "a.lora_A.weight".to_string(),
        Tensor::zeros((2, 3), DType::F32, &dev).unwrap(),
    );
    tensors.insert(
        "a.lora_B.weight".to_string(),
        Tensor::zeros((3, 2), DType::U32, &dev).unwrap(),
    );
    save_safetensors(&p, &tensors, &HashMap::new()).unwrap();
    // The generic loader keeps integer tensors (optimizer step counts are integers)...
    assert_eq!(
        load_safetensors(&p, &dev).unwrap()["a.lora_B.weight"].dtype(),
        DType::U32
    );
    // ...the weight loader names the tensor, its dtype and the file.
    let err = load_float_safetensors(&p, &dev).unwrap_err().to_string();
    assert!(
        err.contains("adapter_model.safetensors") && err.contains("`a.lora_B.weight` (U32)"),
        "{err}"
    );
}
