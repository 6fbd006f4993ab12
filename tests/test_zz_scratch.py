import torch, time
from reference import as_float64
def test_s(tiny_llama):
    m = as_float64(tiny_llama)
    for L in [1,2,5,10,20,39]:
        ids = torch.randint(0, 500, (1, L))
        with torch.no_grad():
            t=time.time(); m(ids); t1=time.time()-t
            t=time.time(); tiny_llama(ids); t2=time.time()-t
        print(L, t1, t2)
