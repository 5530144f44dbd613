use super::*;
use candle_core::Device;

fn var(vals: &[f64], dtype: DType) -> Var {
    Var::from_tensor(
        &Tensor::from_slice(vals, vals.len(), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    )
    .unwrap()
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn grads(items: &[(&str, &[f64])]) -> Gradients {
    let mut g = Gradients::new();
    for (n, v) in items {
        g.insert(*n, &Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap())
            .unwrap();
    }
    g
}

fn model_msg(err: Error) -> String {
    match err {
        Error::Model(m) => m,
        other => panic!("expected Error::Model, got {other}"),
    }
}

/// torch's formula in plain f64.
struct Reference {
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl Reference {
    fn step(&mut self, cfg: &AdamWConfig, g: &[f64], lr: f64, wd: f64) {
        self.t += 1;
        let bc1 = 1.0 - cfg.beta1.powf(self.t as f64);
        let bc2 = 1.0 - cfg.beta2.powf(self.t as f64);
        for (i, &g) in g.iter().enumerate() {
            self.p[i] *= 1.0 - lr * wd;
            self.m[i] = cfg.beta1 * self.m[i] + (1.0 - cfg.beta1) * g;
            self.v[i] = cfg.beta2 * self.v[i] + (1.0 - cfg.beta2) * g * g;
            let denom = self.v[i].sqrt() / bc2.sqrt() + cfg.eps;
            self.p[i] -= lr / bc1 * self.m[i] / denom;
        }
    }
}

#[test]
fn f64_param_matches_the_torch_formula() {
    let cfg = AdamWConfig::default();
    let init = [0.5, -1.0, 2.0];
    let x = var(&init, DType::F64);
    let mut opt = AdamW::new(
        cfg,
        vec![ParamGroup::new("g", 0.1)],
        vec![("x".into(), x.clone(), 0)],
    )
    .unwrap();
    let mut r = Reference {
        p: init.to_vec(),
        m: vec![0.0; 3],
        v: vec![0.0; 3],
        t: 0,
    };
    let gs: [[f64; 3]; 3] = [[0.1, -0.2, 0.3], [1.0, 0.5, -0.25], [-0.3, 0.0, 2.0]];
    for (i, g) in gs.iter().enumerate() {
        let lr = 0.01 * (i + 1) as f64;
        opt.step(&grads(&[("x", g)]), lr).unwrap();
        r.step(&cfg, g, lr, 0.1);
    }
    let got = vals(x.as_tensor());
    for (a, b) in got.iter().zip(&r.p) {
        assert!((a - b).abs() < 1e-14, "{got:?} vs {:?}", r.p);
    }
    let st = opt.state_tensors().unwrap();
    assert_eq!(st["exp_avg.x"].dtype(), DType::F64);
    for (a, b) in vals(&st["exp_avg_sq.x"]).iter().zip(&r.v) {
        assert!((a - b).abs() < 1e-15);
    }
    assert_eq!(opt.num_steps(), 3);
    assert_eq!(opt.param_step("x"), Some(3));
}

#[test]
fn param_without_grad_is_skipped_entirely() {
    let a = var(&[1.0, 2.0], DType::F32);
    let b = var(&[3.0, 4.0], DType::F32);
    let mut opt = AdamW::new(
        AdamWConfig::default(),
        vec![ParamGroup::new("decay", 0.5)],
        vec![("a".into(), a.clone(), 0), ("b".into(), b.clone(), 0)],
    )
    .unwrap();
    opt.step(&grads(&[("a", &[1.0, 1.0])]), 0.1).unwrap();
    assert_eq!(
        vals(b.as_tensor()),
        vec![3.0, 4.0],
        "no weight decay either"
    );
    assert_ne!(vals(a.as_tensor()), vec![1.0, 2.0]);
    assert_eq!(opt.param_step("a"), Some(1));
    assert_eq!(opt.param_step("b"), Some(0));
    assert_eq!(opt.num_steps(), 1);
    // An empty gradient set still counts as an optimizer step and changes nothing.
    opt.step(&Gradients::new(), 0.1).unwrap();
    assert_eq!(opt.num_steps(), 2);
    assert_eq!(opt.param_step("a"), Some(1));
}

#[test]
fn lr_scale_and_zero_lr() {
    let a = var(&[1.0], DType::F32);
    let b = var(&[1.0], DType::F32);
    let mut g0 = ParamGroup::new("full", 0.0);
    g0.lr_scale = 1.0;
    let mut g1 = ParamGroup::new("half", 0.0);
    g1.lr_scale = 0.5;
    let mut opt = AdamW::new(
        AdamWConfig::default(),
        vec![g0, g1],
        vec![("a".into(), a.clone(), 0), ("b".into(), b.clone(), 1)],
    )
    .unwrap();
    // lr 0: params stay, moments and step counts still advance (torch).
    opt.step(&grads(&[("a", &[1.0]), ("b", &[1.0])]), 0.0)
        .unwrap();
    assert_eq!(vals(a.as_tensor()), vec![1.0]);
    assert_eq!(opt.param_step("b"), Some(1));
    opt.step(&grads(&[("a", &[1.0]), ("b", &[1.0])]), 0.1)
        .unwrap();
    // Adam's first steps move by about lr (m / sqrt(v) = 1 for a constant grad).
    let da = 1.0 - vals(a.as_tensor())[0];
    let db = 1.0 - vals(b.as_tensor())[0];
    assert!((da - 0.1).abs() < 1e-6, "{da}");
    assert!((db - 0.05).abs() < 1e-6, "{db}");
}

#[test]
fn half_precision_param_keeps_f32_moments() {
    let x = var(&[1.0, -1.0], DType::BF16);
    let mut opt = AdamW::new(
        AdamWConfig::default(),
        vec![ParamGroup::default()],
        vec![("x".into(), x.clone(), 0)],
    )
    .unwrap();
    let mut g = Gradients::new();
    g.insert(
        "x",
        &Tensor::new(&[0.5f32, -0.5], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(g.get("x").unwrap().dtype(), DType::F32);
    opt.step(&g, 0.25).unwrap();
    assert_eq!(x.dtype(), DType::BF16);
    assert_eq!(vals(x.as_tensor()), vec![0.75, -0.75]);
    let st = opt.state_tensors().unwrap();
    assert_eq!(st["exp_avg.x"].dtype(), DType::F32);
    assert_eq!(st["exp_avg_sq.x"].dtype(), DType::F32);
    assert_eq!(st["step.x"].dtype(), DType::I64);
}

#[test]
fn update_builds_no_graph() {
    let x = var(&[1.0, 2.0], DType::F32);
    let mut opt = AdamW::new(
        AdamWConfig::default(),
        vec![ParamGroup::default()],
        vec![("x".into(), x.clone(), 0)],
    )
    .unwrap();
    for _ in 0..2 {
        let loss = (x.as_tensor() * 3.0).unwrap().sum_all().unwrap();
        let store = loss.backward().unwrap();
        let g = Gradients::from_store(&opt.params(), &store).unwrap();
        assert_eq!(vals(g.get("x").unwrap()), vec![3.0, 3.0]);
        opt.step(&g, 0.1).unwrap();
    }
    // The moments do not depend on the var: a backward from them yields no grad for it.
    let st = opt.state_tensors().unwrap();
    let store = st["exp_avg.x"].sum_all().unwrap().backward().unwrap();
    assert!(store.get(x.as_tensor()).is_none());
    assert!(x.as_tensor().is_variable());
}

#[test]
fn new_rejects_bad_input() {
    let x = var(&[1.0], DType::F32);
    let groups = || vec![ParamGroup::default()];
    let err = AdamW::new(
        AdamWConfig::default(),
        groups(),
        vec![("x".into(), x.clone(), 1)],
    )
    .unwrap_err();
    assert!(model_msg(err).contains("`x` is in group 1"));
    let y = var(&[1.0], DType::F32);
    let err = AdamW::new(
        AdamWConfig::default(),
        groups(),
        vec![("x".into(), x.clone(), 0), ("x".into(), y, 0)],
    )
    .unwrap_err();
    assert!(model_msg(err).contains("`x` given twice"));
    let err = AdamW::new(
        AdamWConfig::default(),
        groups(),
        vec![("x".into(), x.clone(), 0), ("x2".into(), x.clone(), 0)],
    )
    .unwrap_err();
    assert!(model_msg(err).contains("`x2`"));
    let ints = Var::from_tensor(&Tensor::new(&[1u32], &Device::Cpu).unwrap()).unwrap();
    let err = AdamW::new(
        AdamWConfig::default(),
        groups(),
        vec![("ids".into(), ints, 0)],
    )
    .unwrap_err();
    assert!(model_msg(err).contains("`ids` has non-float dtype"));
    let cfg = AdamWConfig {
        beta2: 1.0,
        ..AdamWConfig::default()
    };
    let err = AdamW::new(cfg, groups(), vec![]).unwrap_err();
    assert!(matches!(err, Error::Config { key, .. } if key == "beta2"));
    let err = AdamW::new(
        AdamWConfig::default(),
        vec![ParamGroup::new("g", -0.1)],
        vec![],
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Config { key, reason, .. } if key == "weight_decay" && reason.contains("`g`"))
    );
}

#[test]
fn step_rejects_bad_input_without_updating() {
    let x = var(&[1.0, 2.0], DType::F32);
    let mut opt = AdamW::new(
        AdamWConfig::default(),
        vec![ParamGroup::default()],
        vec![("x".into(), x.clone(), 0)],
    )
    .unwrap();
    let err = opt
        .step(&grads(&[("x", &[1.0, 1.0]), ("nope", &[1.0])]), 0.1)
        .unwrap_err();
    assert!(model_msg(err).contains("unknown param `nope`"));
    let err = opt.step(&grads(&[("x", &[1.0])]), 0.1).unwrap_err();
    assert!(model_msg(err).contains("gradient of `x` has shape [1]"));
    for lr in [-0.1, f64::NAN, f64::INFINITY] {
        assert!(opt.step(&grads(&[("x", &[1.0, 1.0])]), lr).is_err());
    }
    assert_eq!(vals(x.as_tensor()), vec![1.0, 2.0]);
    assert_eq!(opt.num_steps(), 0);
    assert_eq!(opt.param_step("x"), Some(0));
}

fn two_param_opt() -> (AdamW, Var, Var) {
    let a = var(&[1.0, 2.0], DType::F32);
    let b = var(&[3.0], DType::F32);
    let opt = AdamW::new(
        AdamWConfig::default(),
        vec![ParamGroup::new("d", 0.01)],
        vec![("a".into(), a.clone(), 0), ("b".into(), b.clone(), 0)],
    )
    .unwrap();
    (opt, a, b)
}

#[test]
fn state_round_trip_and_errors_name_the_key() {
    let (mut opt, _, _) = two_param_opt();
    opt.step(&grads(&[("a", &[0.5, -0.5]), ("b", &[2.0])]), 0.1)
        .unwrap();
    opt.step(&grads(&[("a", &[0.1, 0.2])]), 0.1).unwrap();
    let state = opt.state_tensors().unwrap();
    assert_eq!(state.len(), 7);

    let (mut fresh, _, _) = two_param_opt();
    fresh.load_state_tensors(&state).unwrap();
    assert_eq!(fresh.num_steps(), 2);
    assert_eq!(fresh.param_step("a"), Some(2));
    assert_eq!(fresh.param_step("b"), Some(1));
    let again = fresh.state_tensors().unwrap();
    for (k, v) in &state {
        assert_eq!(vals(v), vals(&again[k]), "{k}");
    }

    let err_of = |edit: &dyn Fn(&mut HashMap<String, Tensor>)| {
        let mut s = state.clone();
        edit(&mut s);
        let (mut o, _, _) = two_param_opt();
        let msg = model_msg(o.load_state_tensors(&s).unwrap_err());
        // Nothing was loaded.
        assert_eq!(o.num_steps(), 0);
        assert_eq!(o.param_step("a"), Some(0));
        msg
    };
    assert!(err_of(&|s| {
        s.remove("exp_avg_sq.b");
    })
    .contains("missing key `exp_avg_sq.b`"));
    assert!(err_of(&|s| {
        s.remove(NUM_STEPS_KEY);
    })
    .contains("missing key `num_steps`"));
    assert!(err_of(&|s| {
        s.insert(
            "exp_avg.c".into(),
            Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
        );
    })
    .contains("unexpected key `exp_avg.c`"));
    let msg = err_of(&|s| {
        s.insert(
            "exp_avg.a".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    assert!(
        msg.contains("`exp_avg.a` has shape [3]") && msg.contains("param `a`"),
        "{msg}"
    );
    assert!(err_of(&|s| {
        s.insert("step.a".into(), Tensor::new(-1i64, &Device::Cpu).unwrap());
    })
    .contains("`step.a` must be a non-negative integer"));
    assert!(err_of(&|s| {
        s.insert("step.a".into(), Tensor::new(1.5f32, &Device::Cpu).unwrap());
    })
    .contains("`step.a` must be a non-negative integer"));
    assert!(err_of(&|s| {
        s.insert(
            "step.b".into(),
            Tensor::new(&[1i64, 2], &Device::Cpu).unwrap(),
        );
    })
    .contains("`step.b` must hold one value"));

    // Steps stored as f32 (torch's own dtype) or u32 load too.
    let mut s = state.clone();
    s.insert("step.a".into(), Tensor::new(2f32, &Device::Cpu).unwrap());
    s.insert("step.b".into(), Tensor::new(&[1u32], &Device::Cpu).unwrap());
    let (mut o, _, _) = two_param_opt();
    o.load_state_tensors(&s).unwrap();
    assert_eq!(o.param_step("a"), Some(2));
    assert_eq!(o.param_step("b"), Some(1));
}

#[test]
fn gradients_from_store_accumulate_scale() {
    let a = var(&[1.0, 2.0], DType::F32);
    let b = var(&[3.0], DType::F32);
    let params = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
    let loss = (a.as_tensor() * 2.0).unwrap().sum_all().unwrap();
    let g1 = Gradients::from_store(&params, &loss.backward().unwrap()).unwrap();
    assert_eq!(g1.len(), 1, "b took no part: absent");
    assert!(g1.get("b").is_none());
    let loss = (a.as_tensor() * b.as_tensor().broadcast_as(2).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let g2 = Gradients::from_store(&params, &loss.backward().unwrap()).unwrap();
    let mut acc = g1.clone();
    acc.accumulate(g2).unwrap();
    assert_eq!(vals(acc.get("a").unwrap()), vec![5.0, 5.0]);
    assert_eq!(vals(acc.get("b").unwrap()), vec![3.0]);
    acc.scale(0.5).unwrap();
    assert_eq!(vals(acc.get("a").unwrap()), vec![2.5, 2.5]);
    assert!(acc.scale(f64::NAN).is_err());
    let err = acc.accumulate(grads(&[("a", &[1.0])])).unwrap_err();
    assert!(model_msg(err).contains("cannot accumulate `a`"));
    assert_eq!(vals(acc.get("a").unwrap()), vec![2.5, 2.5]);
    let dup = vec![("a".to_string(), a.clone()), ("a".to_string(), b)];
    let store = loss.backward().unwrap();
    assert!(model_msg(Gradients::from_store(&dup, &store).unwrap_err()).contains("`a` given twice"));
    let ints = Tensor::new(&[1u32], &Device::Cpu).unwrap();
    assert!(Gradients::new().insert("i", &ints).is_err());
}

#[test]
fn clipping_follows_torch() {
    let mut g = grads(&[("a", &[3.0, 0.0]), ("b", &[4.0])]);
    assert_eq!(g.global_norm().unwrap(), 5.0);
    let n = g.clip_global_norm(1.0).unwrap();
    assert_eq!(n, 5.0);
    let coef = 1.0 / (5.0 + 1e-6);
    let a = vals(g.get("a").unwrap());
    assert!((a[0] - 3.0 * coef).abs() < 1e-7);
    assert!((g.global_norm().unwrap() - 5.0 * coef).abs() < 1e-6);
    // Below the threshold: untouched.
    let mut g = grads(&[("a", &[0.3]), ("b", &[0.4])]);
    assert!((g.clip_global_norm(1.0).unwrap() - 0.5).abs() < 1e-7);
    assert_eq!(vals(g.get("a").unwrap()), vec![0.3], "f64 grads stay f64");
    // Empty: norm 0, nothing to do.
    let mut e = Gradients::new();
    assert_eq!(e.clip_global_norm(1.0).unwrap(), 0.0);
    assert!(e.is_empty());
    assert!(g.clip_global_norm(-1.0).is_err());
    assert!(g.clip_global_norm(f64::NAN).is_err());
    // Non-finite norm: returned, not an error (torch's error_if_nonfinite=False).
    let mut g = grads(&[("a", &[f64::INFINITY, 1.0])]);
    assert!(g.clip_global_norm(1.0).unwrap().is_infinite());
}

#[test]
fn zero_sized_param_is_fine() {
    let x = Var::from_tensor(&Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let mut opt = AdamW::new(
        AdamWConfig::default(),
        vec![ParamGroup::default()],
        vec![("x".into(), x, 0)],
    )
    .unwrap();
    let mut g = Gradients::new();
    g.insert(
        "x",
        &Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    opt.step(&g, 0.1).unwrap();
    assert_eq!(opt.param_step("x"), Some(1));
    assert_eq!(g.global_norm().unwrap(), 0.0);
}
