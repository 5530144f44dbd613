//! Turning a [`TrainPlan`] into a [`Trainer`]: the heavy part. Loads the weights with the
//! stage's trainable set (full groups as `Var`s, LoRA adapters fresh or from the previous stage,
//! the previous stage's fully trained weights in place of the base ones), the proxy vectors, and
//! the optimizer over exactly the parameters the plan announced.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use candle_core::{Device, Var};

use super::{Trainer, TrainerState};
use crate::adapter::read_adapter;
use crate::config::{InstructionMode, ProxyInit, WeightDType};
use crate::data::feature_cache::FeatureCache;
use crate::error::{Error, Result};
use crate::method::proxy::ProxyInstruction;
use crate::model::lora::LoraFactory;
use crate::model::recompute::Recompute;
use crate::model::vision_key::vision_cache_key;
use crate::model::weights::WeightStore;
use crate::model::{LoadOptions, VisionLanguageModel};
use crate::train::checkpoint::load_float_safetensors;
use crate::train::distributed::{Collective, Solo};
use crate::train::optim::{AdamW, AdamWConfig, ParamGroup};
use crate::train::plan::{
    recipe_lora_error, TrainPlan, VisionCacheUse, FULL_WEIGHTS, PROXY_FILE, PROXY_PARAM,
};

/// What a trainable tensor is, typed: the loop, the checkpoint and the exports dispatch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamRole {
    /// A weight of a fully trained module group (the group's name).
    Full(&'static str),
    /// A LoRA A or B matrix.
    Lora,
    /// The proxy-instruction vectors.
    Proxy,
}

impl ParamRole {
    /// The name plans and metrics group parameters under.
    pub fn group_name(self) -> &'static str {
        match self {
            ParamRole::Full(g) => g,
            ParamRole::Lora => "lora",
            ParamRole::Proxy => PROXY_PARAM,
        }
    }
}

/// One trainable tensor: its export name and what it is.
#[derive(Clone)]
pub struct TrainParam {
    /// Canonical weight name, `{module}.lora_A.weight` / `.lora_B.weight`, or `proxy`.
    pub name: String,
    pub var: Var,
    pub role: ParamRole,
}

impl Trainer {
    /// Load the stage's model and trainable set (see the module docs), for a run alone.
    pub fn new(plan: TrainPlan) -> Result<Self> {
        Self::with_collective(plan, Rc::new(Solo))
    }

    /// [`Trainer::new`] for one rank of a data-parallel run; the plan must be made for the
    /// collective's world size ([`TrainPlan::build_for_world`]).
    pub fn with_collective(plan: TrainPlan, collective: Rc<dyn Collective>) -> Result<Self> {
        if plan.world_size != collective.world_size() {
            return Err(Error::Distributed(format!(
                "the plan of stage `{}` is for {} ranks, the run has {}",
                plan.stage.name,
                plan.world_size,
                collective.world_size()
            )));
        }
        let batches = plan.batch_maker()?.clone();
        let device = plan.device.clone();
        let trainable_dtype = plan.cfg.model.trainable_dtype.dtype();
        let lora = match &plan.lora {
            Some(l) => Some(
                match &l.from {
                    Some(dir) => {
                        let a = read_adapter(dir, &device, plan.layout.family.key_map())?;
                        LoraFactory::new(a.spec, l.trains, plan.cfg.train.seed)?
                            .with_loaded(a.weights)
                    }
                    None => LoraFactory::new(l.spec.clone(), true, plan.cfg.train.seed)?,
                }
                .with_dtype(trainable_dtype),
            ),
            None => None,
        };
        let overrides = match plan
            .previous
            .as_ref()
            .map(|p| p.join(FULL_WEIGHTS))
            .filter(|p| p.is_file())
        {
            Some(f) => load_float_safetensors(&f, &device)?,
            None => HashMap::new(),
        };
        let groups = plan.full_groups.clone();
        let trainable_rows = plan.trained_row_slices();
        let (model, store) = plan
            .layout
            .family
            .load(
                plan.model_dir(),
                LoadOptions {
                    device: device.clone(),
                    dtype: plan.cfg.model.dtype.dtype(),
                    trainable: Some(Box::new(move |name: &str| {
                        groups.iter().any(|g| g.contains(name))
                    })),
                    lora,
                    overrides,
                    trainable_rows,
                    trainable_dtype,
                },
            )
            .map_err(|e| recipe_lora_error(&plan.cfg, e))?;
        let mut batches = batches;
        batches.vision_cache = open_vision_cache(&plan, &store)?;
        let proxy = proxy_for_stage(&plan, model.as_ref(), &device)?;
        let mut params: Vec<TrainParam> = store
            .trainable_vars()
            .into_iter()
            .map(|(name, var)| {
                let group = plan.param_group(&name).map_or("full", |g| g.name);
                TrainParam {
                    name,
                    var,
                    role: ParamRole::Full(group),
                }
            })
            .collect();
        if let Some(lora) = store.lora() {
            for e in lora.entries() {
                for (suffix, var) in [("lora_A", e.a_var), ("lora_B", e.b_var)] {
                    if let Some(var) = var {
                        params.push(TrainParam {
                            name: format!("{}.{suffix}.weight", e.module),
                            var,
                            role: ParamRole::Lora,
                        });
                    }
                }
            }
        }
        if let (Some(p), true) = (&proxy, plan.stage.train_proxy) {
            params.push(TrainParam {
                name: PROXY_PARAM.into(),
                var: p.var().clone(),
                role: ParamRole::Proxy,
            });
        }
        check_params_match_plan(&plan, &params)?;
        let optim = optimizer(&plan, &params)?;
        let schedule = plan.schedule()?;
        let lora_runtime = store.lora().map(|l| l.runtime());
        let recompute = plan.activation_checkpointing().then(|| {
            let vars = params.iter().map(|p| p.var.clone()).collect();
            Recompute::new(vars, lora_runtime.clone())
        });
        let mut model = model;
        model.set_recompute(recompute.clone());
        Ok(Self {
            plan,
            model,
            store,
            proxy,
            params,
            batches,
            optim,
            schedule,
            lora_runtime,
            state: TrainerState::default(),
            collective,
            recompute,
        })
    }
}

/// The stage's frozen-vision feature cache, when the plan uses one: its key is computed from the
/// loaded weights, and the plan's reading of the vision group (frozen) is checked against them.
fn open_vision_cache(plan: &TrainPlan, store: &WeightStore) -> Result<Option<Arc<FeatureCache>>> {
    let VisionCacheUse::On { dir, max_bytes } = plan.vision_cache() else {
        return Ok(None);
    };
    let Some(key) = vision_cache_key(&plan.layout, store, &plan.processor)? else {
        return Ok(None);
    };
    if key.trainable > 0 {
        return Err(Error::Model(format!(
            "stage `{}`: the plan reads {} as frozen, but {} of its parameters loaded as trainable",
            plan.stage.name, key.group, key.trainable
        )));
    }
    let cache = FeatureCache::open(&dir, &key.key, max_bytes)?;
    let stats = cache.stats();
    tracing::info!(
        "vision cache {} ({} MiB used of {} MiB)",
        cache.dir().display(),
        stats.bytes >> 20,
        max_bytes >> 20
    );
    Ok(Some(Arc::new(cache)))
}

/// The loaded trainable set must be what the plan (and `--dry-run`) announced from the layout:
/// a mismatch means the family's shapes from `config.json` disagree with its model code.
fn check_params_match_plan(plan: &TrainPlan, params: &[TrainParam]) -> Result<()> {
    let mut loaded: BTreeMap<String, usize> = BTreeMap::new();
    for p in params {
        *loaded.entry(p.role.group_name().to_string()).or_default() += p.var.elem_count();
    }
    let planned = plan.trainable_counts();
    if loaded != planned {
        return Err(Error::Model(format!(
            "stage `{}`: the model loaded from {} trains {loaded:?} parameters, but its \
             config.json announces {planned:?} (the {} family's layout disagrees with its model)",
            plan.stage.name,
            plan.model_dir().display(),
            plan.layout.family.name()
        )));
    }
    Ok(())
}

/// AdamW over the stage's parameters: names matching `optim.no_decay` get no weight decay.
fn optimizer(plan: &TrainPlan, params: &[TrainParam]) -> Result<AdamW> {
    let cfg = &plan.cfg.optim;
    let groups = vec![
        ParamGroup {
            name: "decay".into(),
            weight_decay: cfg.weight_decay,
            lr_scale: 1.0,
        },
        ParamGroup {
            name: "no_decay".into(),
            weight_decay: 0.0,
            lr_scale: 1.0,
        },
    ];
    let params = params
        .iter()
        .map(|p| {
            let no_decay = cfg.no_decay.iter().any(|k| p.name.contains(k.as_str()));
            (p.name.clone(), p.var.clone(), usize::from(no_decay))
        })
        .collect();
    let adam = AdamWConfig {
        beta1: cfg.betas[0],
        beta2: cfg.betas[1],
        eps: cfg.eps,
    };
    let adamw = AdamW::new(adam, groups, params)?;
    match plan.cfg.model.trainable_dtype {
        WeightDType::F32 => Ok(adamw),
        _ => adamw.with_moments_in_param_dtype(),
    }
}

/// Proxy vectors for a proxy-mode stage: the previous stage's, else freshly initialised.
fn proxy_for_stage(
    plan: &TrainPlan,
    model: &dyn VisionLanguageModel,
    device: &Device,
) -> Result<Option<ProxyInstruction>> {
    let (cfg, stage) = (&plan.cfg, &plan.stage);
    if stage.instruction_mode != InstructionMode::Proxy {
        return Ok(None);
    }
    let hidden = model.hidden_size();
    let previous: Option<&Path> = plan.previous.as_deref();
    let mut proxy = match previous.map(|p| p.join(PROXY_FILE)).filter(|p| p.is_file()) {
        Some(f) => {
            let p = ProxyInstruction::load(&f, device)?;
            if p.tokens() != cfg.proxy.tokens || p.hidden() != hidden {
                return Err(Error::Weights(format!(
                    "{} holds {}x{} proxy vectors; this stage needs {}x{hidden}",
                    f.display(),
                    p.tokens(),
                    p.hidden(),
                    cfg.proxy.tokens
                )));
            }
            // A new stage starts its own average from the vectors it inherits.
            ProxyInstruction::from_tensor(p.var().as_tensor().clone())?
        }
        None if cfg.proxy.init == ProxyInit::Text => {
            let t = cfg.proxy.init_text.as_deref().unwrap_or_default();
            let ids = plan.batch_maker()?.text.encode_plain(t)?;
            ProxyInstruction::from_text_embeddings(&model.embed_ids(&ids)?, cfg.proxy.tokens)?
        }
        None => ProxyInstruction::uniform(
            cfg.proxy.tokens,
            hidden,
            cfg.proxy.bound,
            cfg.train.seed,
            device,
        )?,
    };
    if let Some(m) = stage.momentum {
        proxy.enable_momentum(m)?;
    }
    Ok(Some(proxy))
}
