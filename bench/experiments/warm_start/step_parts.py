"""One-off timing of the warm start's parts on random batches (48 x 34 tokens): frozen encoder forward per depth,
decoder step (forward, backward, AdamW) per shape. Usage: python bench/experiments/warm_start/step_parts.py THREADS
"""
import sys, time, torch, transformers as tf
torch.manual_seed(0)
threads=int(sys.argv[1]); torch.set_num_threads(threads)
B,S,T=48,34,34   # ~1600 src tokens
def enc(layers): return tf.BertModel(tf.BertConfig(vocab_size=13400,hidden_size=384,num_hidden_layers=layers,num_attention_heads=12,intermediate_size=1536),add_pooling_layer=False)
def dec(layers,h,ffn,heads): return tf.BertLMHeadModel(tf.BertConfig(vocab_size=8002,hidden_size=h,num_hidden_layers=layers,num_attention_heads=heads,intermediate_size=ffn,is_decoder=True,add_cross_attention=True))
src=torch.randint(5,13000,(B,S)); tgt=torch.randint(5,8000,(B,T))
def time_it(f,n=4):
    f(); t=time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-t)/n
for el in (12,8,6):
    e=enc(el).eval()
    def fe():
        with torch.no_grad(): return e(input_ids=src).last_hidden_state
    h=fe()
    print(f"threads {threads} encoder {el} fwd: {time_it(fe):.3f}s", flush=True)
for (l,hd,ffn,heads) in ((3,384,1536,12),(2,384,1536,12),(3,256,1024,8),(4,256,1024,8),(6,256,1024,8)):
    d=dec(l,hd,ffn,heads); proj=torch.nn.Linear(384,hd) if hd!=384 else torch.nn.Identity()
    opt=torch.optim.AdamW([*d.parameters(),*proj.parameters()],lr=1e-4)
    def fd():
        out=d(input_ids=tgt,encoder_hidden_states=proj(h),labels=tgt); out.loss.backward(); opt.step(); opt.zero_grad()
    print(f"threads {threads} decoder {l}x{hd} ffn {ffn} fwd+bwd+adam: {time_it(fd):.3f}s", flush=True)
