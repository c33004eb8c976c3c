"""Controlled GAN-recipe experiments behind docs/gan_recipe.md (in memory, no training loop).

Needs SynthVox + shards in $AVPGAN_EXP/{synthvox,shards} (160 identities were used) and a voice
stage's weights (`--enc`, e.g. from `make demo`); see docs/gan_recipe.md for the commands.
Prints probe figures (pixel, Lite0, and a probe on D's own trunk) for unseen and train voices and writes sample grids.
"""
import time, sys, json, csv
from pathlib import Path
import numpy as np, torch, torch.nn.functional as F

from avpgan.audio import crop_or_tile
from avpgan.data.shards import load_manifest
from avpgan.evaluate import split_samples
from avpgan.features import LogMel
from avpgan.config import FeatureConfig
from avpgan import models
from avpgan.images import make_grid, save_png
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from projected_d import ProjD  # the Projected-GAN D (--projd) and the pooling its C and --pid read

EXP = Path(__import__("os").environ.get("AVPGAN_EXP", "data/recipe"))
SH = EXP / "shards"

def load_split(split):
    m = load_manifest(SH)
    audio, face, label, names = [], [], [], []
    for s in split_samples(SH, m, split, lambda n: True, []):
        audio.append(np.array(s["audio"])); face.append(np.array(s["face"])); label.append(int(s["meta"]["label"])); names.append(s["meta"]["name"])
    return dict(audio=audio, face=np.stack(face), label=np.array(label), names=names)

def attrs():
    out = {}
    with open(EXP / "synthvox" / "attributes.csv") as f:
        for r in csv.DictReader(f):
            out[r["vggface_name"]] = dict(gender=1.0 if r["gender"]=="m" else -1.0, tone=float(r["tone"]), age=float(r["age"]))
    return out

def faces_t(u8):
    return torch.from_numpy(u8).permute(0,3,1,2).float().sub(127.5).div(127.5).contiguous()

def ridge(x, y, lam=1.0):
    mu, sd = x.mean(0), x.std(0)+1e-6
    xs = (x-mu)/sd
    w = np.linalg.solve(xs.T@xs + lam*np.eye(xs.shape[1]), xs.T@(y-y.mean()))
    return lambda z: ((z-mu)/sd)@w + y.mean()

def pix(faces_u8_or_t, size=16):
    t = faces_u8_or_t if torch.is_tensor(faces_u8_or_t) else faces_t(faces_u8_or_t)
    return F.interpolate(t, size=(size,size), mode="bilinear", antialias=True, align_corners=False).flatten(1).numpy()
import argparse
ap = argparse.ArgumentParser()
ap.add_argument("--enc", default="data/demo/run/voice/model.safetensors", help="a voice stage's weights (tiny widths)"); ap.add_argument("--steps", type=int, default=1000); ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--gch", default="[128,64,32,16,8]"); ap.add_argument("--dch", default="[8,16,32,64,64]")
ap.add_argument("--bn", type=int, default=1); ap.add_argument("--tanh", type=int, default=1); ap.add_argument("--init", default="dcgan"); ap.add_argument("--dinit", default="default")
ap.add_argument("--sn", type=int, default=0); ap.add_argument("--dsn", type=int, default=0); ap.add_argument("--cbam", type=int, default=0); ap.add_argument("--lr", type=float, default=2e-4); ap.add_argument("--glr", type=float, default=0)
ap.add_argument("--aug", default="", help="DiffAugment ops before D, e.g. color,translation,cutout"); ap.add_argument("--ema", type=float, default=0.999); ap.add_argument("--up", default="transposed"); ap.add_argument("--r1", type=float, default=0.0)
ap.add_argument("--secs", type=float, default=4.0); ap.add_argument("--tag", default="x"); ap.add_argument("--every", type=int, default=250); ap.add_argument("--cw", type=float, default=1.0)
ap.add_argument("--l1", type=float, default=0.0, help="weight of G's L1 to a photo of the voice's identity, at --l1size px")
ap.add_argument("--l1size", type=int, default=16)
ap.add_argument("--adv", type=float, default=1.0, help="weight of G's adversarial term")
ap.add_argument("--size", type=int, default=64, help="train the GAN at this face size (G and D widths must match); faces are scored at 64 px")
ap.add_argument("--robust", type=int, default=0, help="fit the Lite0 probe on real faces at 64, 32 and 16 px detail")
ap.add_argument("--cblur", type=int, default=0, help="C judges identity on faces low-passed to this size (0: full resolution)")
ap.add_argument("--proj", type=float, default=0.0, help="projection term <P e, h(x)> in D's real/fake logit, with this weight (0: off)")
ap.add_argument("--ls", type=float, default=0.0, help="label smoothing of C's loss on real faces")
ap.add_argument("--mis", type=float, default=0.0, help="weight of mismatched (real face, other voice) pairs as D negatives (needs --proj)")
ap.add_argument("--acfake", type=float, default=0.0, help="also train C on the fakes with their voices' identities, with this weight (AC-GAN)")
ap.add_argument("--projd", type=int, default=0, help="D and C on frozen Lite0 features of the faces at this size (Projected GAN); 0: the project's D")
ap.add_argument("--pc", default="lite0", help="with --projd: C on the Lite0 features (lite0) or on the project's own CNN trunk (cnn)")
ap.add_argument("--dlib", type=int, default=0, help="also probe with dlib's face descriptor (optional wheels), a network no G here trains against")
ap.add_argument("--pdeep", type=int, default=0, help="with --projd: heads that judge each tap whole (down to 4 x 4) instead of patch by patch")
ap.add_argument("--ms", type=float, default=0.0, help="mode-seeking term (Mao et al. 2019): G is paid for faces as far apart as their voices, with this weight")
ap.add_argument("--pboth", type=int, default=0, help="with --projd and --pc cnn: D's logit is the projected heads' plus the project's own D's")
ap.add_argument("--seed", type=int, default=0, help="torch seed of the networks' init and the batches")
ap.add_argument("--pwidth", type=int, default=64, help="width of each projected D head")
ap.add_argument("--pid", type=float, default=0.0, help="identity term in frozen Lite0 space: G paid for faces whose pooled deep features point like its voice's identity's real faces, with this weight")
ap.add_argument("--mbstd", type=int, default=0, help="with --projd: a minibatch-standard-deviation channel in each head (StyleGAN), against collapse")
ap.add_argument("--decay", type=float, default=0.0, help="decay both learning rates linearly to 0 over this last fraction of the steps (0: constant)")
a = ap.parse_args()
torch.set_num_threads(int(__import__("os").environ.get("NT","2")))
tr, te = load_split("train"), load_split("test")
A = attrs()
lm = LogMel(FeatureConfig(normalize=False))
enc = models.VoiceEncoder(channels=[32,48,64,96]); enc.load_state_dict(load_file(a.enc)); enc.eval()
n = int(a.secs*16000)
def bank(d, k, seed):
    r = np.random.default_rng(seed); out=[]
    with torch.no_grad():
        for i in range(0, len(d["audio"]), 64):
            x = torch.from_numpy(np.stack([crop_or_tile(au, n, r) for au in d["audio"][i:i+64] for _ in range(k)]))
            out.append(F.normalize(enc(lm(x)),dim=1).view(-1,k,64))
    return torch.cat(out)
t0=time.time(); btr = bank(tr, 8, 0); bte = bank(te, 1, 1)[:,0]; print("bank", time.time()-t0, flush=True)
ftr = faces_t(tr["face"]); fte = faces_t(te["face"]); ltr = torch.from_numpy(tr["label"])
ids = int(ltr.max())+1
by_id = [torch.nonzero(ltr==l).flatten() for l in range(ids)]
resize = lambda x, n: F.interpolate(x, size=(n, n), mode="bilinear", antialias=x.shape[-1] > n, align_corners=False)
at_train_size = lambda x: resize(x, a.size) if a.size != 64 else x  # what D and C see
ftr_train = at_train_size(ftr)
lowpass = lambda x: resize(resize(x, a.cblur), x.shape[-1]) if a.cblur else x
torch.manual_seed(a.seed)
gch, dch = json.loads(a.gch), json.loads(a.dch)
G = models.Generator(channels=gch, spectral_norm=bool(a.sn), cbam=bool(a.cbam), cbam_reduction=4, batch_norm=bool(a.bn), tanh=bool(a.tanh), init=a.init, upsample=a.up)
D = models.FaceDiscriminator(ids, channels=dch, spectral_norm=bool(a.sn or a.dsn), cbam=bool(a.cbam), cbam_reduction=4, init=a.dinit)
if a.projd:
    Dc = D if a.pc == "cnn" else None  # the project's D/C: its classifier head only
    D = ProjD(ids, a.projd, a.pwidth, 64 if a.proj else 0, bool(a.pdeep), bool(a.mbstd))
else:
    Dc = None
from avpgan.train.ema import EMA
ema = EMA(G, a.ema)
from avpgan.models.augment import diff_augment
policy = [o for o in a.aug.split(',') if o and o != "grey"]
def grey(x, p=0.5):  # luminance for a random half of the images, so C must tell identities apart by shape
    lum = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
    return torch.where(torch.rand(x.shape[0], 1, 1, 1) < p, lum, x)
T = lambda x: grey(diff_augment(x, policy)) if "grey" in a.aug.split(',') else diff_augment(x, policy)
P = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(64, D.real_fake.in_features if hasattr(D, "real_fake") else 1, bias=False))
def logit_of(h, e):
    base = D.real_fake(h).squeeze(1)
    return base + a.proj * (P(e) * h).sum(1) if a.proj else base
if a.pid:  # per identity: the mean of its real train faces' pooled Lite0 features, standardised over all faces
    from avpgan.models.perceptual import PerceptualNet
    pnet = PerceptualNet(input_size=64, layer_weights=(1.0, 1.0), taps=(10, 15))
    pool = lambda x: ProjD.pooled(pnet(x))  # the features the projected C reads
    with torch.no_grad(): preal = torch.cat([pool(ftr[j:j + 64]) for j in range(0, len(ftr), 64)])
    pmu, psd = preal.mean(0), preal.std(0) + 1e-6
    ptarget = F.normalize(torch.stack([((preal[by_id[l]] - pmu) / psd).mean(0) for l in range(ids)]), dim=1)
og = torch.optim.Adam(G.parameters(), lr=a.glr or a.lr, betas=(0.5,0.999)); od = torch.optim.Adam([p for p in [*D.parameters(), *P.parameters(), *(Dc.parameters() if Dc else [])] if p.requires_grad], lr=a.lr, betas=(0.5,0.999))
# pixel probes fitted on real train faces
ptr = pix(ftr); yg = np.array([A[nm]["gender"] for nm in tr["names"]]); yt = np.array([A[nm]["tone"] for nm in tr["names"]])
pg, pt = ridge(ptr, yg, 10.0), ridge(ptr, yt, 10.0)
ygte = np.array([A[nm]["gender"] for nm in te["names"]]); ytte = np.array([A[nm]["tone"] for nm in te["names"]])
from avpgan.image_stats import FaceFeatures
lite0 = FaceFeatures("cpu")
# --robust: fit the Lite0 probe on real train faces at 64, 32 and 16 px detail (each resized back to
# 64), so that it reads gender and tone rather than sharpness
scales = [64, 32, 16] if a.robust else [64]
ltr0 = np.concatenate([lite0(resize(resize(ftr, n), 64)) for n in scales]); mu0, sd0 = ltr0.mean(0), ltr0.std(0) + 1e-6
yg_r, yt_r = np.tile(yg, len(scales)), np.tile(yt, len(scales))
lg_, lt_ = ridge((ltr0 - mu0) / sd0, yg_r, 1000.0), ridge((ltr0 - mu0) / sd0, yt_r, 1000.0)
lp = lambda f: (lite0(f) - mu0) / sd0
for n in (32, 16):
    l0 = lp(resize(resize(fte, n), 64)); print(f"real test at {n} px detail, Lite0 probe: gender", np.mean(np.sign(lg_(l0)) == ygte), "tone r", np.corrcoef(lt_(l0), ytte)[0, 1])
l0 = lp(fte); print("real test, Lite0 probe: gender", np.mean(np.sign(lg_(l0)) == ygte), "tone r", np.corrcoef(lt_(l0), ytte)[0, 1])
pte = pix(fte); print("real test: gender", np.mean(np.sign(pg(pte))==ygte), "tone r", np.corrcoef(pt(pte), ytte)[0,1])
if a.dlib:  # fitted on one real train face per sample, cached: dlib takes ~0.1 s a face
    from avpgan.evaluate.embedders import DlibEmbedder
    dl = DlibEmbedder(); cache = EXP / "dlib_train.npy"
    if not cache.exists(): np.save(cache, dl(ftr))
    dtr = np.load(cache); dgp, dtp = ridge(dtr, yg, 1.0), ridge(dtr, yt, 1.0)
    d0 = dl(fte); print("real test, dlib probe: gender", np.mean(np.sign(dgp(d0)) == ygte), "tone r", np.corrcoef(dtp(d0), ytte)[0, 1])
# fixed grid: 8 train ids, 8 test ids
gtr_i = torch.tensor([by_id[l][0].item() for l in range(0, ids, ids//8)][:8]); gte_i = torch.arange(0, len(te["audio"]), len(te["audio"])//8)[:8]
trv_i = torch.tensor([by_id[l][0].item() for l in range(ids)])  # one utterance per train identity
def evaluate(net, s, mode="eval"):
    net.train(mode == "train")
    with torch.no_grad():
        fake = resize(net(bte).clamp(-1,1), 64); ftrain = resize(net(btr[gtr_i,0]).clamp(-1,1), 64)
    net.train()
    p = pix(fake); gacc = np.mean(np.sign(pg(p))==ygte); tr_ = np.corrcoef(pt(p), ytte)[0,1]
    spread = fake.std(0).mean().item() / fte.std(0).mean().item()
    l = lp(fake); lgacc = np.mean(np.sign(lg_(l)) == ygte); ltr = np.corrcoef(lt_(l), ytte)[0, 1]
    with torch.no_grad():
        net.train(mode == "train"); ftv = resize(net(btr[trv_i, 0]).clamp(-1, 1), 64); net.train()
    trg = np.mean(np.sign(lg_(lp(ftv))) == yg[trv_i.numpy()]); trpg = np.mean(np.sign(pg(pix(ftv))) == yg[trv_i.numpy()])
    with torch.no_grad():  # what D's own trunk sees: a probe fitted on its features of real train faces
        D.eval(); hr = D.features(ftr_train).numpy(); hf = D.features(at_train_size(fake)).numpy(); D.train()
    dg = ridge(hr, yg, 1.0); dgacc = np.mean(np.sign(dg(hf)) == ygte)
    auc = lambda sc, y: np.mean((sc[y > 0][:, None] > sc[y < 0][None, :]))  # P(male scores above female)
    lauc = auc(lg_(l), ygte)
    dls = ""
    if a.dlib:
        d0 = dl(fake); dls = f"; dlib probe gender {np.mean(np.sign(dgp(d0)) == ygte):.2f} tone r {np.corrcoef(dtp(d0), ytte)[0, 1]:.2f}"
    grid = make_grid([ftr[gtr_i], ftrain, fte[gte_i], fake[gte_i]], nrow=8)
    save_png(grid, EXP / f"grid_{a.tag}_{s:05d}.png")
    return f"pixel probe gender {gacc:.2f} tone r {tr_:.2f}; Lite0 probe gender {lgacc:.2f} tone r {ltr:.2f}; spread {spread:.2f}; train voices gender pixel/Lite0 {trpg:.2f}/{trg:.2f}; D-trunk probe gender {dgacc:.2f}; Lite0 gender AUC {lauc:.2f}{dls}"
t0=time.time()
for s in range(1, a.steps+1):
    if a.decay:  # linear decay to 0 over the last `decay` of the run
        frac = min(1.0, (a.steps - s + 1) / (a.decay * a.steps))
        for o, base in ((og, a.glr or a.lr), (od, a.lr)):
            for gr in o.param_groups: gr["lr"] = base * frac
    i = torch.randint(0, len(btr), (a.batch,)); k = torch.randint(0, 8, (a.batch,))
    emb = models.voice_embedding(btr[i, k], 0.05); lab = ltr[i]
    fi = torch.stack([by_id[l][torch.randint(0, len(by_id[l]), (1,))].squeeze() for l in lab.tolist()])
    face = ftr_train[fi]; flip = torch.rand(a.batch) < 0.5; face = torch.where(flip[:,None,None,None], face.flip(3), face)
    fake = G(emb)
    real_in = T(face).requires_grad_(a.r1 > 0)
    if a.cblur:
        logit, idl = D(torch.cat([real_in, T(fake.detach()), lowpass(real_in)]))
        ld, _ = models.d_loss(logit[:a.batch], logit[a.batch:2 * a.batch]); lc, pc = models.c_loss(idl[2 * a.batch:], lab)
    elif a.projd:
        x = torch.cat([real_in, T(fake.detach())])
        logit, idl = D(x, torch.cat([emb, emb]) if a.proj else None)
        if Dc is not None and a.pboth:  # the project's own D (one trunk with C) adds its real/fake logit
            own, idl = Dc(torch.cat([face, fake.detach()])); logit = logit + own
        elif Dc is not None: idl = Dc(face)[1]  # C judges the faces unaugmented: augmentation hides identity
        ld, _ = models.d_loss(logit[:a.batch], logit[a.batch:]); lc, pc = models.c_loss(idl[:a.batch], lab)
    elif a.proj:
        h = D.features(torch.cat([real_in, T(fake.detach())])); idl = D.classifier(h)
        ee = torch.cat([emb, emb]); logit = logit_of(h, ee)
        ld, _ = models.d_loss(logit[:a.batch], logit[a.batch:]); lc, pc = models.c_loss(idl[:a.batch], lab)
        if a.mis:
            shift = emb.roll(1, 0); other = lab.roll(1, 0) != lab
            lm_ = F.binary_cross_entropy_with_logits(logit_of(h[:a.batch], shift), torch.zeros(a.batch), reduction="none")
            ld = ld + a.mis * (lm_ * other).sum() / other.sum().clamp(min=1)
    else:
        logit, idl = D(torch.cat([real_in, T(fake.detach())]))
        ld, _ = models.d_loss(logit[:a.batch], logit[a.batch:]); lc, pc = models.c_loss(idl[:a.batch], lab)
        if a.ls: lc = F.cross_entropy(idl[:a.batch], lab, label_smoothing=a.ls)
        if a.acfake: lc = lc + a.acfake * F.cross_entropy(idl[a.batch:], lab)
    if a.r1 > 0:
        g, = torch.autograd.grad(logit[:a.batch].sum(), real_in, create_graph=True)
        ld = ld + 0.5 * a.r1 * g.square().flatten(1).sum(1).mean()
    od.zero_grad(); (ld+lc).backward(); od.step()
    if a.cblur:
        fl, fid = D(torch.cat([T(fake), lowpass(T(fake))])); fl, fid = fl[:a.batch], fid[a.batch:]
    elif a.projd:
        fl, fid = D(T(fake), emb if a.proj else None)
        if Dc is not None:
            own, fid = Dc(fake)
            if a.pboth: fl = fl + own
    elif a.proj:
        h = D.features(T(fake)); fl, fid = logit_of(h, emb), D.classifier(h)
    else:
        fl, fid = D(T(fake))
    lg = a.adv*F.binary_cross_entropy_with_logits(fl, torch.ones_like(fl)) + a.cw*F.cross_entropy(fid, lab)
    if a.ms > 0:  # pairs within the batch: the face distance per unit of voice distance, maximised
        ratio = (fake - fake.roll(1, 0)).abs().mean((1, 2, 3)) / (emb - emb.roll(1, 0)).abs().mean(1).clamp(min=1e-5)
        lg = lg - a.ms * ratio.mean()
    if a.pid > 0:
        lg = lg + a.pid * (1 - (F.normalize((pool(fake) - pmu) / psd, dim=1) * ptarget[lab]).sum(1)).mean()
    if a.l1 > 0:
        down = lambda x: F.interpolate(x, size=(a.l1size, a.l1size), mode="bilinear", antialias=True, align_corners=False)
        lg = lg + a.l1 * (down(fake) - down(face)).abs().mean()
    og.zero_grad(); lg.backward(); og.step(); D.zero_grad(set_to_none=True)
    if Dc is not None: Dc.zero_grad(set_to_none=True)
    ema.update(G)
    if s % a.every == 0 or s == a.steps:
        print(s, f"{time.time()-t0:.0f}s ld {ld.item():.3f} lc {lc.item():.2f} cacc {pc['c_acc_real']:.2f} lg {lg.item():.3f} | G:", evaluate(G, s), "| EMA:", evaluate(ema.module, s+1), flush=True)
