//! Tests of metrics logging, progress and the loss plot.
use super::*;

fn m(stage: &str, step: u64, loss: f64) -> StepMetrics {
    StepMetrics {
        stage: stage.to_string(),
        step,
        epoch: step as f64 / 10.0,
        loss,
        lr: 1e-4,
        grad_norm: 0.5,
        tokens_per_sec: 1234.5,
        elapsed_sec: step as f64,
        step_sec: 1.0,
        data_wait_sec: 0.0,
        skipped_nonfinite: 0,
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn log_round_trip_and_nan_as_null() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("logs").join("metrics.jsonl");
    let mut log = MetricsLog::open(&p, None).unwrap();
    log.write(&m("stage1", 1, 2.5)).unwrap();
    log.write(&m("stage1", 2, f64::NAN)).unwrap();
    // Visible to readers before the log is closed.
    let text = fs::read_to_string(&p).unwrap();
    assert_eq!(text.lines().count(), 2);
    assert!(text.lines().nth(1).unwrap().contains("\"loss\":null"));
    let back = MetricsLog::read_all(&p).unwrap();
    assert_eq!(back[0], m("stage1", 1, 2.5));
    assert!(back[1].loss.is_nan());
    drop(log);
    // Opening fresh truncates.
    let _log = MetricsLog::open(&p, None).unwrap();
    assert!(MetricsLog::read_all(&p).unwrap().is_empty());
    assert_eq!(entries(&dir.path().join("logs")), vec!["metrics.jsonl"]);
}

#[test]
fn resume_truncates_to_resume_step() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("metrics.jsonl");
    let mut log = MetricsLog::open(&p, None).unwrap();
    for s in 1..=3 {
        log.write(&m("stage1", s, 3.0)).unwrap();
    }
    for s in 1..=5 {
        log.write(&m("stage2", s, 2.0)).unwrap();
    }
    drop(log);

    // Resume stage2 from step 3: stage1 intact, stage2 steps 4 and 5 gone.
    let mut log = MetricsLog::open(&p, Some(("stage2".to_string(), 3))).unwrap();
    log.write(&m("stage2", 4, 1.5)).unwrap();
    let steps: Vec<(String, u64)> = MetricsLog::read_all(&p)
        .unwrap()
        .into_iter()
        .map(|x| (x.stage, x.step))
        .collect();
    let want: Vec<(String, u64)> = [("stage1", 1), ("stage1", 2), ("stage1", 3)]
        .into_iter()
        .chain([("stage2", 1), ("stage2", 2), ("stage2", 3), ("stage2", 4)])
        .map(|(s, n)| (s.to_string(), n))
        .collect();
    assert_eq!(steps, want);
    drop(log);

    // Resume stage1 from step 2: everything logged after stage1's step 2 is dropped.
    let _log = MetricsLog::open(&p, Some(("stage1".to_string(), 2))).unwrap();
    let steps: Vec<u64> = MetricsLog::read_all(&p)
        .unwrap()
        .into_iter()
        .map(|x| x.step)
        .collect();
    assert_eq!(steps, vec![1, 2]);

    // Resuming with no file yet starts an empty one.
    let q = dir.path().join("new.jsonl");
    let _log = MetricsLog::open(&q, Some(("stage1".to_string(), 9))).unwrap();
    assert_eq!(fs::read_to_string(&q).unwrap(), "");
    assert_eq!(entries(dir.path()), vec!["metrics.jsonl", "new.jsonl"]);
}

#[test]
fn resume_drops_torn_last_line_but_rejects_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("metrics.jsonl");
    let good = serde_json::to_string(&m("s", 1, 1.0)).unwrap();
    fs::write(&p, format!("{good}\n{}", &good[..good.len() / 2])).unwrap();
    let _log = MetricsLog::open(&p, Some(("s".to_string(), 10))).unwrap();
    assert_eq!(fs::read_to_string(&p).unwrap(), format!("{good}\n"));

    fs::write(&p, format!("{good}\nnot json\n{good}\n")).unwrap();
    let err = MetricsLog::open(&p, Some(("s".to_string(), 10))).unwrap_err();
    let chain = format!("{:#}", anyhow::Error::from(err));
    assert!(
        chain.contains("metrics.jsonl") && chain.contains("line 2"),
        "{chain}"
    );
    // The file is left untouched on error.
    assert_eq!(
        fs::read_to_string(&p).unwrap(),
        format!("{good}\nnot json\n{good}\n")
    );
}

#[test]
fn read_all_error_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("metrics.jsonl");
    let good = serde_json::to_string(&m("s", 1, 1.0)).unwrap();
    fs::write(
        &p,
        format!(
            "{good}\n\n{}\n",
            good.replace("\"step\":1", "\"step\":\"x\"")
        ),
    )
    .unwrap();
    let err = MetricsLog::read_all(&p).unwrap_err();
    let chain = format!("{:#}", anyhow::Error::from(err));
    assert!(chain.contains("metrics.jsonl"), "{chain}");
    assert!(chain.contains("line 3, column"), "{chain}");
    assert!(!chain.contains("at line 1"), "{chain}");
    let err = MetricsLog::read_all(&dir.path().join("nope.jsonl")).unwrap_err();
    assert!(format!("{err}").contains("nope.jsonl"));
}

#[test]
fn tick_labels_are_short() {
    assert_eq!(tick_label(0.0), "0");
    assert_eq!(tick_label(0.92), "0.92");
    assert_eq!(tick_label(3.0), "3");
    assert_eq!(tick_label(-2.5), "-2.5");
    assert_eq!(tick_label(1e300), "1.00e300");
    assert_eq!(tick_label(2e-5), "2.00e-5");
}

#[test]
fn progress_hidden_when_quiet() {
    let p = TrainProgress::new("stage1", 10, 3, true);
    assert!(p.is_hidden());
    p.update(&m("stage1", 4, 1.0));
    p.suspend(|| ());
    p.finish();
}

fn check_png(path: &Path) {
    let bytes = fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let img = image::open(path).unwrap();
    assert_eq!((img.width(), img.height()), PLOT_SIZE);
}

#[test]
fn plot_two_stages_writes_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("loss.png");
    let mut ms: Vec<StepMetrics> = (1..=50)
        .map(|s| m("stage1", s, 3.0 / (s as f64).sqrt()))
        .collect();
    ms.extend((1..=30).map(|s| m("stage2", s, 1.0 / (s as f64).sqrt())));
    ms.push(m("stage2", 31, f64::NAN));
    plot_loss(&ms, &out, "Loss").unwrap();
    check_png(&out);
    assert_eq!(entries(dir.path()), vec!["loss.png"]);
    // The plot is not blank: both stage colours appear.
    let img = image::open(&out).unwrap().to_rgb8();
    for c in &PALETTE[..2] {
        assert!(img.pixels().any(|p| p.0 == [c.0, c.1, c.2]), "{c:?}");
    }
}

#[test]
fn plot_degenerate_inputs_do_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p.png");
    plot_loss(&[], &out, "empty").unwrap();
    check_png(&out);
    plot_loss(&[m("s", 7, 1.0)], &out, "one point").unwrap();
    check_png(&out);
    plot_loss(
        &[m("s", 1, f64::NAN), m("s", 2, f64::INFINITY)],
        &out,
        "nan",
    )
    .unwrap();
    check_png(&out);
    plot_loss(&[m("s", 1, 0.0), m("s", 2, 0.0)], &out, "flat").unwrap();
    check_png(&out);
    plot_loss(&[m("s", 0, -1e300), m("s", u64::MAX, 1e300)], &out, "huge").unwrap();
    check_png(&out);
    let err = plot_loss(&[m("s", 1, 1.0)], &dir.path().join("no/dir/p.png"), "t").unwrap_err();
    assert!(format!("{err}").contains("p.png"), "{err}");
}
