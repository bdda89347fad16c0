"""Peak RSS of the vit_tiny step: momentum keys before/after the online forward x fuse_views.

Needs the code of commit b357f8f (InstanceSpace.prepare, keys first); "last" patches prepare out.
    for k in first last; do for f in 0 1; do python benchmarks/results/rss_keys_order.py $k $f; done; done
"""
import sys, resource
import opera.supervisions.instance as inst
if sys.argv[1]=='last': inst.InstanceSpace.prepare=lambda self, stage: None
from opera.bench import bench_step
r=bench_step(backbone='vit_tiny',img_size=64,batch_size=64,steps=8,warmup=3,threads=2,patch_size=8,mlp_dim=1024,fuse_views=sys.argv[2]=='1')
print(sys.argv[1:], round(r['peak_rss_mb']), round(r['img_per_s'],1))
