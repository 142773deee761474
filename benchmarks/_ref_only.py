import sys,os,json,time,resource,warnings,collections
os.environ.setdefault("OMP_WAIT_POLICY","PASSIVE")
warnings.filterwarnings("ignore")
from transformers.utils import logging as hf_logging; hf_logging.disable_progress_bar()
from progadv_trl.demo.pipeline import DemoConfig, build_assets, train_reference, load_models, sample_rollouts
out, seed = sys.argv[1], int(sys.argv[2])
over = {k: json.loads(v) for k, v in (a.split("=",1) for a in sys.argv[3:])}
cfg = DemoConfig.from_dict({"out_dir": out, "seed": seed, **over})
cpu=lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
t0,c0=time.time(),cpu()
build_assets(cfg.out_dir, cfg.seed, cfg); t1,c1=time.time(),cpu()
train_reference(cfg); t2,c2=time.time(),cpu()
tok,models=load_models(cfg,("reference",))
def cat(r):
    m=r["metadata"]
    if r["success"]: return "success"
    if m["failure_kind"]=="luck": return "luck"
    a,_,e=m["failure_reason"].partition(" instead of ")
    an,en=a.split("(")[0],e.split("(")[0]
    if an==en and a!=e: return "wrong id"
    return f"{an}->{en}"
recs=sample_rollouts(models["reference"],tok,cfg.tasks("eval"),1,greedy=True,seed=cfg.seed,world=cfg.world,max_new_tokens=cfg.max_new_tokens)
sys.path.insert(0,"/work/wt11/benchmarks"); from demo_learning import decision_probe
print("RESULT", decision_probe(models["reference"], tok, cfg.tasks("eval")[:60]), over, "seed", seed, collections.Counter(cat(r) for r in recs).most_common(), "assets", round(t1-t0), round(c1-c0), "sft", round(t2-t1), round(c2-c1))
