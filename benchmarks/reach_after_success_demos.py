"""Experiment (2026-11-28): reach-v3 expert demos that go on for K steps after the first success.

`quantvla sim demos` ends an episode at its first successful step, i.e. on Meta-World's 5-cm
success radius; this records the 50 starts of one train seed with K more expert steps, into a
shard folder `quantvla train` reads. Result in docs/default-policy.md: no difference from the
same fine-tune on the usual demos (validation reach 58% vs 58%).
Usage: python benchmarks/reach_after_success_demos.py SEED K OUT_DIR   (SEED in 0..3)
"""
import sys, numpy as np
from pathlib import Path
from quantvla_core.sim.demos import EnvSettings
from quantvla_core.sim.env import starts_for
from quantvla_core.sim.expert import ScriptedExpert
from quantvla_core.sim.shards import Episode, write_shard
seed=int(sys.argv[1]); K=int(sys.argv[2]); out=Path(sys.argv[3])
task="reach-v3"; st=EnvSettings(); env=st.make(task); ex=ScriptedExpert(task)
eps=[]
for s in starts_for(task,(seed,)):
    obs=env.reset(s.seed,s.index); I,S,A=[],[],[]; extra=0
    while env.steps < env.max_steps and extra <= K:
        a=ex.action(env.sim_obs)
        I.append(np.stack(obs["images"])); S.append(obs["state"]); A.append(a)
        if env.success: extra+=1
        env.sim_obs,_,_,_,info=env._env.step(np.clip(a,-1,1)); env.steps+=1
        env.success = env.success or bool(info["success"])
        obs=env.observation()
    if env.success:
        eps.append(Episode(task,s.seed,s.index,env.instruction,np.stack(I),np.stack(S),np.stack(A)))
write_shard(out/f"{task}__s{seed}_i00-49.npz",eps,st.cameras,{"image_size":st.image_size,"max_steps":st.max_steps,"goal_marker_scale":st.goal_marker_scale,"source":"metaworld expert, +%d steps after success"%K})
print(seed,len(eps),sum(len(e.actions) for e in eps))
