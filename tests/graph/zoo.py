"""A zoo of small architectures built in code, each a pattern the graph engine must handle.

Every factory returns `(model, per-sample input shape)`; models are in eval mode with
non-trivial BatchNorm statistics, seeded by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _eval(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm running statistics and affine parameters, then eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
        if isinstance(m, nn.PReLU):
            m.weight.data.uniform_(0.1, 0.4)
    return model.eval()


class MTCNN(nn.Module):
    """O-Net style: (conv → PReLU → max-pool) × 3, a dense layer, a softmax and a box head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.PReLU(4), nn.MaxPool2d(2, 2, ceil_mode=True),
            nn.Conv2d(4, 6, 3), nn.PReLU(6), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(6, 8, 2), nn.PReLU(8))
        self.dense = nn.Linear(8, 12)
        self.prelu = nn.PReLU(12)
        self.cls = nn.Linear(12, 2)
        self.box = nn.Linear(12, 4)

    def forward(self, x):
        h = self.prelu(self.dense(self.features(x).flatten(1)))
        return F.softmax(self.cls(h), dim=1), self.box(h)


class BasicBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=2, bias=False),
                                        nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        out = F.relu(out)  # functional: part of the graph, not a leaf layer
        return out


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(3))
        self.layer2 = nn.Sequential(Bottleneck(3, 2, 4))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeezed: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, squeezed, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeezed, c, 1)
        self.scale_act = nn.Hardsigmoid()

    def forward(self, x):
        scale = self.scale_act(self.fc2(self.relu(self.fc1(self.avgpool(x)))))
        return scale * x


class MobileNetV3(nn.Module):
    """Stem, an inverted residual with a depthwise conv and squeeze-excite, a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(4), nn.Hardswish())
        self.expand = nn.Sequential(nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6),
                                    nn.Hardswish())
        self.depthwise = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False),
                                       nn.BatchNorm2d(6), nn.Hardswish())
        self.se = SqueezeExcite(6, 2)
        self.project = nn.Sequential(nn.Conv2d(6, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(4, 8), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(8, 3))

    def forward(self, x):
        h = self.stem(x)
        h = h + self.project(self.se(self.depthwise(self.expand(h))))
        return self.classifier(self.pool(h).flatten(1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class ViT(nn.Module):
    """Patch embedding, class token, a hand-written pre-norm block and a PyTorch encoder layer."""

    def __init__(self, dim: int = 8, encoder: bool = True):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, 5, dim) * 0.5)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        # TorchScript cannot take nn.TransformerEncoderLayer to an op graph (see tests)
        self.encoder = (nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.1,
                                                   batch_first=True) if encoder else None)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        t = t + self.attn(self.norm1(t))
        t = t + self.mlp(self.norm2(t))
        if self.encoder is not None:
            t = self.encoder(t)
        return self.head(t[:, 0])


class RecurrentClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.gru = nn.GRU(5, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        seq, _ = self.lstm(torch.tanh(self.embed(x)))
        _, hidden = self.gru(seq)
        return self.fc(hidden[-1])


class UNet(nn.Module):
    """Encoder, a transposed-conv decoder, a concatenated skip connection."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU())
        self.down = nn.MaxPool2d(2)
        self.mid = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(4, 3, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(6, 3, 3, padding=1), nn.Tanh())
        self.out = nn.Conv2d(3, 1, 1)

    def forward(self, x):
        skip = self.enc(x)
        h = self.up(self.mid(self.down(skip)))
        return self.out(self.dec(torch.cat([h, skip], dim=1)))


class InPlace(nn.Module):
    """In-place ops between modules: `h *= 2`, a sliced `h[:, :2] *= 3`, `out += identity`."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 5)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(5, 5)
        self.fc3 = nn.Linear(5, 3)

    def forward(self, x):
        identity = x
        h = self.fc1(x)
        h *= 2
        h[:, :2] *= 3
        out = self.fc2(self.act(h))
        out += identity
        return self.fc3(out)


def mtcnn():
    return _eval(MTCNN()), (3, 16, 16)


def resnet():
    return _eval(ResNet()), (2, 6, 6)


def mobilenet():
    return _eval(MobileNetV3()), (3, 8, 8)


def vit():
    return _eval(ViT()), (3, 8, 8)


def vit_scriptable():
    return _eval(ViT(encoder=False)), (3, 8, 8)


def recurrent():
    return _eval(RecurrentClassifier()), (4, 3)


def unet():
    return _eval(UNet()), (1, 4, 4)


def inplace():
    return _eval(InPlace()), (5,)


ZOO = {"mtcnn": mtcnn, "resnet": resnet, "mobilenet": mobilenet, "vit": vit,
       "vit_scriptable": vit_scriptable, "recurrent": recurrent, "unet": unet,
       "inplace": inplace}
