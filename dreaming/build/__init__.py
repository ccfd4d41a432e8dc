"""Building what a bundle holds, apart from using it: documents and the default corpus (corpus), transcoders fitted
in closed form (train) or trained by gradient as a CLT (train_clt), the recipes by name (recipes), their evaluation
(evaluate), the default bundle (default) and a bundle of a user's model, dictionary and corpus (create).

Nothing on the read path (a bundle opened, the explorer, the engine, the service and its workers) imports this
package, so serving never loads the training code.
"""
