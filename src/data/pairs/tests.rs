use super::*;
use std::fs;

fn png(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    image::RgbImage::new(4, 4).save(&p).unwrap();
    p
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, content).unwrap();
    p
}

fn config_reason(err: Error) -> (PathBuf, String) {
    match err {
        Error::Config { path, key, reason } => {
            assert_eq!(key, "pairs", "unexpected key in {reason}");
            (path, reason)
        }
        other => panic!("expected Error::Config, got {other:?}"),
    }
}

#[test]
fn csv_happy_path_with_quoted_commas_and_newlines() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(d, "a.png");
    png(d, "sub/b.png");
    let abs = png(d, "abs/c.png");
    let csv = format!(
        "id,image,text\n\
         1,a.png,  left lung opacity \n\
         2,sub/b.png,\"big, round cell, \"\"purple\"\"\"\n\
         3,{},\"two\nlines\"\n\
         4,a.png,last\n",
        abs.display()
    );
    let m = write(d, "pairs.csv", &csv);
    let pairs = load_pairs(&PairSource::new(&m)).unwrap();
    let f = m.display();
    assert_eq!(
        pairs,
        vec![
            Pair {
                image: d.join("a.png"),
                text: "left lung opacity".into(),
                source: format!("{f}:2"),
            },
            Pair {
                image: d.join("sub/b.png"),
                text: "big, round cell, \"purple\"".into(),
                source: format!("{f}:3"),
            },
            Pair {
                image: abs.clone(),
                text: "two\nlines".into(),
                source: format!("{f}:4"),
            },
            Pair {
                image: d.join("a.png"),
                text: "last".into(),
                source: format!("{f}:6"),
            },
        ]
    );
}

#[test]
fn csv_description_column_and_explicit_image_root() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(d, "images/x.png");
    fs::create_dir_all(d.join("manifests")).unwrap();
    let m = write(
        d,
        "manifests/m.csv",
        "description,image\nsmall cell,x.png\n",
    );
    let src = PairSource {
        manifest: m.clone(),
        image_root: Some(d.join("images")),
        repeat: 1,
    };
    let pairs = load_pairs(&src).unwrap();
    assert_eq!(pairs.len(), 1);
    assert_eq!(pairs[0].image, d.join("images/x.png"));
    assert_eq!(pairs[0].text, "small cell");
}

#[test]
fn jsonl_happy_path_skips_blank_lines() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(d, "a.png");
    png(d, "b.png");
    let m = write(
        d,
        "p.jsonl",
        "{\"image\": \"a.png\", \"text\": \" round nucleus \"}\n\
         \n   \n\
         {\"image\": \"b.png\", \"description\": \"coarse granules\", \"extra\": 1}\r\n",
    );
    let pairs = load_pairs(&PairSource::new(&m)).unwrap();
    let f = m.display();
    assert_eq!(pairs.len(), 2);
    assert_eq!(pairs[0].text, "round nucleus");
    assert_eq!(pairs[0].source, format!("{f}:1"));
    assert_eq!(pairs[1].image, d.join("b.png"));
    assert_eq!(pairs[1].text, "coarse granules");
    assert_eq!(pairs[1].source, format!("{f}:4"));
}

#[test]
fn llava_json_takes_first_gpt_turn_without_placeholder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(d, "img/a.png");
    let m = write(
        d,
        "llava.json",
        r#"[
              {"id": "pmc-1", "image": "img/a.png", "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image."},
                {"from": "gpt", "value": "<image>\n  A chest X-ray with an opacity.  "},
                {"from": "human", "value": "More?"},
                {"from": "gpt", "value": "No."}
              ]}
            ]"#,
    );
    let pairs = load_pairs(&PairSource::new(&m)).unwrap();
    assert_eq!(
        pairs,
        vec![Pair {
            image: d.join("img/a.png"),
            text: "A chest X-ray with an opacity.".into(),
            source: format!("{}: item 0 (id pmc-1)", m.display()),
        }]
    );
}

#[test]
fn repeat_emits_all_rows_in_order_repeatedly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(d, "a.png");
    png(d, "b.png");
    let m = write(d, "p.csv", "image,text\na.png,first\nb.png,second\n");
    let src = PairSource {
        repeat: 3,
        ..PairSource::new(&m)
    };
    let texts: Vec<String> = load_pairs(&src)
        .unwrap()
        .into_iter()
        .map(|p| p.text)
        .collect();
    assert_eq!(
        texts,
        ["first", "second", "first", "second", "first", "second"]
    );
}

#[test]
fn sources_are_concatenated_each_with_its_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(d, "a.png");
    png(d, "b.png");
    let train = write(d, "train.csv", "image,text\na.png,train row\n");
    let extra = write(
        d,
        "extra.jsonl",
        "{\"image\":\"b.png\",\"text\":\"extra row\"}\n",
    );
    let pairs = load_pair_sources(&[
        PairSource::new(&train),
        PairSource {
            repeat: 3,
            ..PairSource::new(&extra)
        },
    ])
    .unwrap();
    let texts: Vec<&str> = pairs.iter().map(|p| p.text.as_str()).collect();
    assert_eq!(texts, ["train row", "extra row", "extra row", "extra row"]);
}

#[test]
fn a_repeat_that_would_exceed_the_sample_limit_is_refused_before_expanding() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(d, "a.png");
    let m = write(d, "p.csv", "image,text\na.png,first\na.png,second\n");
    let src = PairSource {
        // 2 rows x (limit / 2 + 1) is one pair over the limit; usize::MAX overflows outright.
        repeat: MAX_EXPANDED_PAIRS / 2 + 1,
        ..PairSource::new(&m)
    };
    let e = load_pairs(&src).unwrap_err().to_string();
    assert!(e.contains("p.csv") && e.contains("exceed the limit"), "{e}");
    let src = PairSource {
        repeat: usize::MAX,
        ..PairSource::new(&m)
    };
    assert!(load_pairs(&src).unwrap_err().to_string().contains("repeat"));
}

#[test]
fn every_problem_is_reported_with_its_line_in_one_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(d, "ok.png");
    fs::write(d.join("corrupt.png"), b"this is not a png").unwrap();
    let m = write(
        d,
        "bad.jsonl",
        "{\"image\": \"ok.png\", \"text\": \"fine\"}\n\
         {\"image\": \"ok.png\", \"text\": \n\
         {\"image\": \"ok.png\", \"text\": \"   \"}\n\
         {\"image\": \"missing.png\", \"text\": \"no file\"}\n\
         {\"image\": \"corrupt.png\", \"text\": \"bad bytes\"}\n\
         {\"image\": \"ok.png\"}\n\
         [1, 2]\n\
         {\"image\": 7, \"text\": \"x\"}\n",
    );
    let (path, reason) = config_reason(load_pairs(&PairSource::new(&m)).unwrap_err());
    assert_eq!(path, m);
    let f = m.display();
    assert!(reason.starts_with("7 problems"), "{reason}");
    let expected = [
        format!("{f}:2: malformed JSON"),
        format!("{f}:3: empty `text`"),
        format!(
            "{f}:4: image {} does not exist",
            d.join("missing.png").display()
        ),
        format!(
            "{f}:5: cannot decode image {}",
            d.join("corrupt.png").display()
        ),
        format!("{f}:6: missing field `text` (or `description`)"),
        format!("{f}:7: expected a JSON object, found an array"),
        format!("{f}:8: `image` must be a string, found a number"),
    ];
    let lines: Vec<&str> = reason.lines().skip(1).map(str::trim).collect();
    assert_eq!(lines.len(), expected.len(), "{reason}");
    for (line, want) in lines.iter().zip(&expected) {
        assert!(line.starts_with(want.as_str()), "{line:?} vs {want:?}");
    }
    assert!(!reason.contains(&format!("{f}:1:")), "{reason}");
}

#[test]
fn csv_problems_are_reported_by_record_start_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(d, "ok.png");
    let m = write(
        d,
        "p.csv",
        "image,text\nok.png,\"multi\nline\"\nok.png,\nnope.png,gone\nok.png\n,no image\n",
    );
    let (_, reason) = config_reason(load_pairs(&PairSource::new(&m)).unwrap_err());
    let f = m.display();
    assert!(reason.starts_with("4 problems"), "{reason}");
    assert!(reason.contains(&format!("{f}:4: empty `text`")), "{reason}");
    assert!(reason.contains(&format!("{f}:5: image ")), "{reason}");
    assert!(
        reason.contains(&format!("{f}:6: the row has 1 field(s), the header 2")),
        "{reason}"
    );
    assert!(
        reason.contains(&format!("{f}:7: empty `image`")),
        "{reason}"
    );
}

#[test]
fn csv_rows_with_extra_fields_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(d, "ok.png");
    // An unquoted comma in the text: the row has three fields, not two.
    let m = write(
        d,
        "p.csv",
        "image,text\r\nok.png,fine\r\nok.png,big, round\r\nok.png,also fine\r\n",
    );
    let (_, reason) = config_reason(load_pairs(&PairSource::new(&m)).unwrap_err());
    let f = m.display();
    assert!(reason.starts_with("1 problem "), "{reason}");
    assert!(
        reason.contains(&format!("{f}:3: the row has 3 field(s), the header 2")),
        "{reason}"
    );
}

#[test]
fn csv_duplicate_columns_are_errors_naming_the_column() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(d, "ok.png");
    let m = write(d, "p.csv", "image,text,text\nok.png,first,second\n");
    let (_, reason) = config_reason(load_pairs(&PairSource::new(&m)).unwrap_err());
    assert!(
        reason.contains(&format!(
            "{}:1: duplicate column `text` (columns 2 and 3 of the header)",
            m.display()
        )),
        "{reason}"
    );
}

#[test]
fn csv_unterminated_quote_is_an_error_naming_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(d, "ok.png");
    // Without the check the open quote on line 3 swallows lines 4 and 5 into one text.
    let m = write(
        d,
        "p.csv",
        "image,text\nok.png,first\nok.png,\"second\nok.png,third\nok.png,fourth\n",
    );
    let (_, reason) = config_reason(load_pairs(&PairSource::new(&m)).unwrap_err());
    let f = m.display();
    assert!(reason.starts_with("1 problem "), "{reason}");
    assert!(
        reason.contains(&format!(
            "{f}:3: unterminated quoted field: the quote opened on line 3 is never closed"
        )),
        "{reason}"
    );
}

#[test]
fn image_paths_climbing_out_of_the_image_root_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::create_dir_all(d.join("root/sub")).unwrap();
    // The escaping files exist, so only the path check can refuse them.
    png(d, "outside.png");
    png(d, "root/in.png");
    let abs = png(d, "abs.png");
    let m = write(
        d,
        "root/p.jsonl",
        &format!(
            "{{\"image\": \"../outside.png\", \"text\": \"up\"}}\n\
             {{\"image\": \"sub/../../outside.png\", \"text\": \"up again\"}}\n\
             {{\"image\": \"sub/../in.png\", \"text\": \"inside\"}}\n\
             {{\"image\": \"{}\", \"text\": \"absolute\"}}\n",
            abs.display()
        ),
    );
    let (_, reason) = config_reason(load_pairs(&PairSource::new(&m)).unwrap_err());
    let f = m.display();
    assert!(reason.starts_with("2 problems"), "{reason}");
    let root = d.join("root");
    for (line, path) in [(1, "../outside.png"), (2, "sub/../../outside.png")] {
        assert!(
            reason.contains(&format!(
                "{f}:{line}: image path `{path}` leaves the image root {} (its `..` climbs above it)",
                root.display()
            )),
            "{reason}"
        );
    }
    // CSV manifests and an explicit image root are checked the same way.
    let m = write(d, "p.csv", "image,text\n../outside.png,up\nin.png,ok\n");
    let src = PairSource {
        image_root: Some(root.clone()),
        ..PairSource::new(&m)
    };
    let (_, reason) = config_reason(load_pairs(&src).unwrap_err());
    assert!(reason.starts_with("1 problem "), "{reason}");
    assert!(
        reason.contains(&format!("{}:2: image path `../outside.png`", m.display())),
        "{reason}"
    );
}

#[test]
fn csv_without_required_columns_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let m = write(dir.path(), "p.csv", "img_name,label\na.png,x\n");
    let (_, reason) = config_reason(load_pairs(&PairSource::new(&m)).unwrap_err());
    let f = m.display();
    assert!(
        reason.contains(&format!("{f}:1: the header has no `image` column")),
        "{reason}"
    );
    assert!(
        reason.contains("no `text` or `description` column"),
        "{reason}"
    );
    assert!(reason.contains("`img_name`, `label`"), "{reason}");
}

#[test]
fn llava_problems_name_items() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(d, "a.png");
    let m = write(
        d,
        "l.json",
        r#"[
              {"id": 5, "image": "a.png", "conversations": [{"from": "human", "value": "<image>"}]},
              {"image": "a.png", "conversations": [{"from": "gpt", "value": " <image> "}]},
              "oops",
              {"id": "x", "conversations": []}
            ]"#,
    );
    let (_, reason) = config_reason(load_pairs(&PairSource::new(&m)).unwrap_err());
    let f = m.display();
    for want in [
        format!("{f}: item 0 (id 5): `conversations` has no turn from `gpt`"),
        format!("{f}: item 1: empty description"),
        format!("{f}: item 2: expected a JSON object, found a string"),
        format!("{f}: item 3 (id x): missing field `image`"),
        format!("{f}: item 3 (id x): `conversations` has no turn from `gpt`"),
    ] {
        assert!(reason.contains(&want), "missing {want:?} in {reason}");
    }
}

#[test]
fn malformed_llava_file_reports_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let m = write(dir.path(), "l.json", "[\n{\"image\": \"a.png\",\n}\n");
    let (_, reason) = config_reason(load_pairs(&PairSource::new(&m)).unwrap_err());
    assert!(
        reason.contains(&format!("{}:3: malformed JSON", m.display())),
        "{reason}"
    );
}

#[test]
fn long_problem_lists_are_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let mut csv = String::from("image,text\n");
    for i in 0..25 {
        csv.push_str(&format!("missing{i}.png,text {i}\n"));
    }
    let m = write(dir.path(), "p.csv", &csv);
    let (_, reason) = config_reason(load_pairs(&PairSource::new(&m)).unwrap_err());
    assert!(reason.starts_with("25 problems"), "{reason}");
    assert_eq!(reason.lines().count(), 1 + 20 + 1, "{reason}");
    assert!(reason.ends_with("... and 5 more"), "{reason}");
    assert!(reason.contains(&format!("{}:21:", m.display())), "{reason}");
    assert!(
        !reason.contains(&format!("{}:22:", m.display())),
        "{reason}"
    );
}

#[test]
fn problems_of_all_sources_are_reported_together() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = write(d, "a.csv", "image,text\ngone.png,x\n");
    let b = write(d, "b.jsonl", "{\"image\": \"gone.png\"}\n");
    let (path, reason) =
        config_reason(load_pair_sources(&[PairSource::new(&a), PairSource::new(&b)]).unwrap_err());
    assert_eq!(path, a);
    assert!(reason.contains("of 2 manifests"), "{reason}");
    assert!(
        reason.contains(&format!("{}:2: image", a.display())),
        "{reason}"
    );
    assert!(
        reason.contains(&format!("{}:1: missing field `text`", b.display())),
        "{reason}"
    );
}

#[test]
fn empty_manifest_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let m = write(dir.path(), "p.jsonl", "\n\n");
    let (_, reason) = config_reason(load_pairs(&PairSource::new(&m)).unwrap_err());
    assert!(
        reason.contains("holds no image-description pairs"),
        "{reason}"
    );
}

#[test]
fn unknown_extension_names_the_file() {
    let p = Path::new("data/pairs.txt");
    let err = ManifestFormat::from_path(p).unwrap_err();
    assert!(err.to_string().contains("data/pairs.txt"), "{err}");
    assert!(matches!(
        load_pairs(&PairSource::new(p)),
        Err(Error::Config { .. })
    ));
    assert_eq!(
        ManifestFormat::from_path(Path::new("x/Y.CSV")).unwrap(),
        ManifestFormat::Csv
    );
    assert_eq!(
        ManifestFormat::from_path(Path::new("y.jsonl")).unwrap(),
        ManifestFormat::Jsonl
    );
    assert_eq!(
        ManifestFormat::from_path(Path::new("z.json")).unwrap(),
        ManifestFormat::LlavaJson
    );
    assert!(ManifestFormat::from_path(Path::new("noext")).is_err());
}

#[test]
fn missing_manifest_is_io_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("absent.csv");
    match load_pairs(&PairSource::new(&m)) {
        Err(e @ Error::Io { .. }) => {
            assert!(e.to_string().contains(&m.display().to_string()), "{e}")
        }
        other => panic!("expected Error::Io, got {other:?}"),
    }
}

#[test]
fn zero_repeat_is_rejected() {
    let src = PairSource {
        repeat: 0,
        ..PairSource::new("p.csv")
    };
    match load_pairs(&src) {
        Err(Error::Config { key, .. }) => assert_eq!(key, "repeat"),
        other => panic!("expected Error::Config, got {other:?}"),
    }
}

#[test]
fn many_images_are_checked_in_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut csv = String::from("image,text\n");
    for i in 0..200 {
        png(d, &format!("i{i}.png"));
        csv.push_str(&format!("i{i}.png,t{i}\n"));
    }
    csv.push_str("missing.png,t\n");
    let m = write(d, "p.csv", &csv);
    let (_, reason) = config_reason(load_pairs(&PairSource::new(&m)).unwrap_err());
    assert!(reason.starts_with("1 problem "), "{reason}");
    assert!(
        reason.contains(&format!("{}:202: image", m.display())),
        "{reason}"
    );
}
